"""A toy Hydra app with the training job's side of the sweep contract, without the trainer.

    python tests/sweep_app/app.py -m hydra.sweeper.storage=sqlite:///tmp/optuna.db ...

Like train.py it reads cfg.trial and cfg.tracking, opens a child MLflow run under
tracking.parent_run_id tagged phitune.trial_number, reports a loss per step through
TrialReporter (which may prune), and returns the final loss. `toy.*` makes it slow
(sleep_s), fail (fail_trials), run out of GPU memory (oom_trials) or leave a trace of each
execution and the GPU it was given (log).
"""
from __future__ import annotations

import os
import time

import hydra
from omegaconf import DictConfig

TOKENS_PER_STEP = 100


def objective(x: float, y: int, step: int) -> float:
    # Minimum at x = 0.5, y = 0; decreasing in the step like a training loss.
    return (x - 0.5) ** 2 + 0.1 * y + 1.0 / step


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    import mlflow
    import optuna

    from phitune.sweep.parent import experiment_id
    from phitune.sweep.trial_hook import TrialReporter

    reporter = TrialReporter.from_config(cfg.trial)
    number = cfg.trial.number
    _trace(cfg, f"start {number} {os.getpid()}")
    _trace(cfg, f"device {number} {os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES')}")
    mlflow.set_tracking_uri(cfg.tracking.uri)
    tags = {"phitune.trial_number": str(number), "phitune.study": str(cfg.trial.study_name)}
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    mlflow.start_run(experiment_id=experiment_id(cfg.tracking), tags=tags)
    if reporter:
        reporter.plan(cfg.toy.steps * TOKENS_PER_STEP)  # what the trial trains unless pruned
    try:
        mlflow.log_params({"x": cfg.x, "y": cfg.y})
        loss = float("nan")
        for step in range(1, cfg.toy.steps + 1):
            if cfg.toy.sleep_s:
                time.sleep(cfg.toy.sleep_s)
            if number in cfg.toy.fail_trials and step == 2:
                raise RuntimeError("simulated out of memory")
            if number in cfg.toy.oom_trials and step == 2:
                import torch

                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                             "capacity of 79.11 GiB of which 1.02 GiB is free.")
            loss = objective(cfg.x, cfg.y, step)
            mlflow.log_metric("valid_loss", loss, step=step)
            if reporter:
                reporter.add_tokens(TOKENS_PER_STEP)
                reporter.report(loss, step)
        if reporter:
            reporter.finish()
        mlflow.log_metric("full_valid_loss", loss)
    except optuna.TrialPruned:
        mlflow.set_tag("phitune.trial_state", "pruned")
        mlflow.end_run("FINISHED")
        _trace(cfg, f"pruned {number}")
        raise
    except Exception:
        mlflow.end_run("FAILED")
        _trace(cfg, f"failed {number}")
        raise
    except KeyboardInterrupt:  # as phitune's TrackedRun: Ctrl-C ends the run KILLED
        mlflow.end_run("KILLED")
        raise
    mlflow.end_run("FINISHED")
    _trace(cfg, f"end {number}")
    return loss


def _trace(cfg, line: str) -> None:
    if cfg.toy.log:
        with open(cfg.toy.log, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
