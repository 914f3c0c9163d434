"""The experiment phitune's runs go in: found by name, or created with artifacts beside a
sqlite db and marked as a model-training experiment.

MLflow 3's UI has two faces, GenAI (traces, sessions, judges) and machine learning
(runs, metrics, models). The experiment tag `mlflow.experimentKind` =
`custom_model_development` says "machine learning": MLflow 3.1-3.x read it to open
the experiment on its runs. MLflow 3.17 decides by the workflow type instead (the URL's
`?workflowType=machine_learning`, else the browser's last choice, GenAI at first), so
every link phitune prints carries it too (ui_url). The tag still labels the experiment
for those versions and for the UI's "experiment type" selector.

Torch-free: the sweeper and tests/sweep_app use it without the training stack.
"""
from __future__ import annotations

from pathlib import Path

KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
DEFAULT_UI = "http://127.0.0.1:5000"


def sqlite_artifact_root(uri: str) -> str | None:
    """`sqlite:///mlruns/mlflow.db` -> `<abs>/mlruns/artifacts` (artifacts beside the db)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return (db.parent.resolve() / "artifacts").as_uri()


def get_or_create(client, tracking_cfg) -> str:
    """The id of experiment `tracking_cfg.experiment`, created (tagged as training) if needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(tracking_cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    root = tracking_cfg.get("artifact_root") or sqlite_artifact_root(tracking_cfg.uri)
    location = f"{root.rstrip('/')}/{tracking_cfg.experiment}" if root else None
    try:
        return client.create_experiment(tracking_cfg.experiment, artifact_location=location,
                                        tags={KIND_TAG: TRAINING_KIND})
    except MlflowException:  # created concurrently by another worker
        return client.get_experiment_by_name(tracking_cfg.experiment).experiment_id


def ui_url(experiment_id: str, run_id: str | None = None, base: str = DEFAULT_UI) -> str:
    """The page of an experiment's runs (or of one run) in `mlflow ui`, in its machine-learning view."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"
