"""Optuna sweeps for phitune and for any Hydra app: search spaces, the trial hook a job
calls, MLflow parent runs.

    from phitune.sweep import report
    report(val_loss, step)        # in a job of `python app.py -m`: may stop the trial (pruning)

The Hydra plugin (src/hydra_plugins/phitune_optuna_sweeper) is a thin shell around
`phitune.sweep.driver`. Modules here import optuna and mlflow lazily where a plain
`python train.py` (no sweep) could reach them.
"""
from phitune.sweep.trial_hook import report

__all__ = ["report"]
