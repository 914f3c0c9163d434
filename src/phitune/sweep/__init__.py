"""Optuna sweeps for phitune: search spaces, the trial hook a job calls, MLflow parent runs.

The Hydra plugin (src/hydra_plugins/phitune_optuna_sweeper) is a thin shell around
`phitune.sweep.driver`. Modules here import optuna and mlflow lazily where a plain
`python train.py` (no sweep) could reach them.
"""
