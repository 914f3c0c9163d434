"""How a job finds its trial and its MLflow run: the contract between sweeper and job.

Every job gets its trial through Hydra's `hydra.job.env_set`, which Hydra sets for the
job's duration and restores after, also for the basic launcher's jobs that run in the
sweeper's own process, and sets in a joblib worker before the job runs there:

    PHITUNE_TRIAL_STORAGE   the study's storage URL (`env:NAME` when the URL has a password)
    PHITUNE_TRIAL_STUDY     the study's name
    PHITUNE_TRIAL_NUMBER    the trial's number

`phitune.sweep.report(value, step)` reads them. Then one of two shapes:

- an app with phitune's `trial` and `tracking` nodes (train.py, tests/sweep_app) also gets
  trial.storage, trial.study_name, trial.number and tracking.parent_run_id as overrides,
  and opens its own child MLflow run;
- any other app gets a child run that the sweeper opened for the trial, with its params:

    MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID, MLFLOW_RUN_ID

  so that the app's own `mlflow.start_run()` and `mlflow.log_metric()` land in it. A URI
  with a password is set in the sweeper's environment instead (inherited by the jobs),
  since Hydra writes env_set into each job's .hydra/hydra.yaml (the storage URL likewise:
  phitune.sweep.study.job_storage_ref).
"""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from phitune import redact
from phitune.sweep import space as sp

ENV_STORAGE = "PHITUNE_TRIAL_STORAGE"
ENV_STUDY = "PHITUNE_TRIAL_STUDY"
ENV_NUMBER = "PHITUNE_TRIAL_NUMBER"
MLFLOW_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
JOB_VARS = (ENV_STORAGE, ENV_STUDY, ENV_NUMBER) + MLFLOW_VARS


def has_trial_nodes(cfg) -> bool:
    """The app declares phitune's job side (`trial.storage`, `tracking.parent_run_id`)."""
    trial = OmegaConf.select(cfg, "trial", default=None)
    tracking = OmegaConf.select(cfg, "tracking", default=None)
    return (isinstance(trial, DictConfig) and "storage" in trial
            and isinstance(tracking, DictConfig) and "parent_run_id" in tracking)


def declare_env(config, phitune_app: bool, tracking_uri: str | None = None) -> None:
    """Give hydra.job.env_set the variables of every job, empty, in the sweep's own overrides,
    which Hydra replays under each job's. A job's `hydra.job.env_set.NAME=value` then sets an
    existing key (no `++`), and Hydra's launch line (`#3 : x=0.5 y=1`) leaves it out as it does
    every `hydra.` override. A tracking URI with a password goes in this process's environment."""
    names = [ENV_STORAGE, ENV_STUDY, ENV_NUMBER]
    if not phitune_app:
        names += ["MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"]
        if _loggable(str(tracking_uri)):
            names.append("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = str(tracking_uri)
    declare(config, names)


def declare(config, names: list[str]) -> None:
    """Each name an (empty) hydra.job.env_set key of every job, so that a job's override sets it."""
    from omegaconf import open_dict, read_write

    with read_write(config.hydra), open_dict(config.hydra):
        listed = config.hydra.overrides.hydra
        for name in names:
            line = f"++hydra.job.env_set.{name}=''"
            if line not in listed:
                listed.append(line)


def _loggable(uri: str) -> bool:
    return redact.redact_text(uri) == uri


def env_override(name: str, value) -> str:
    """`hydra.job.env_set.NAME='value'`: a hydra override, so not in the job's overrides.yaml
    nor its folder name (declare_env first)."""
    return f"hydra.job.env_set.{name}={sp.quote(str(value))}"


def trial_overrides(phitune_app: bool, storage_ref: str, study_name: str, number: int,
                    parent_run_id: str | None, mlflow_env: dict | None = None) -> list[str]:
    env = {ENV_STORAGE: storage_ref, ENV_STUDY: study_name, ENV_NUMBER: int(number), **(mlflow_env or {})}
    out = [env_override(k, v) for k, v in env.items()]
    if phitune_app:
        out += [sp.override("trial.storage", storage_ref), sp.override("trial.study_name", study_name),
                f"trial.number={int(number)}", sp.override("tracking.parent_run_id", parent_run_id)]
    return out


def mlflow_env(uri: str, experiment_id: str, run_id: str) -> dict:
    """The MLflow variables of one job (a URI with a password: see declare_env)."""
    env = {"MLFLOW_EXPERIMENT_ID": experiment_id, "MLFLOW_RUN_ID": run_id}
    if _loggable(uri):
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def from_env() -> dict | None:
    """This job's trial ({storage, study_name, number}), or None outside a sweep."""
    storage = os.environ.get(ENV_STORAGE)
    if not storage:
        return None
    return {"storage": storage, "study_name": os.environ.get(ENV_STUDY), "number": os.environ.get(ENV_NUMBER)}
