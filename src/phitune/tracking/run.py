"""One Hydra job = one MLflow run, which always ends FINISHED, FAILED or KILLED.

The run is ended in __exit__ whatever happens: success -> FINISHED; Ctrl-C or SIGTERM
-> KILLED; any other exception -> FAILED with the error as a tag. Nothing is left
RUNNING except by SIGKILL, which no process can catch; resume=true then continues
that run (its id is in the output folder's run.json) and ends it.
"""
from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from phitune import redact
from phitune.train.callbacks import Callback
from phitune.train.memory import failure_line


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the run ends KILLED like on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


def setup_tracking(tracking_cfg) -> str:
    """Point MLflow at the store and return the experiment id (created if needed)."""
    from phitune.tracking.experiment import get_or_create

    redact.quiet_mlflow_url(tracking_cfg.uri)
    mlflow.set_tracking_uri(tracking_cfg.uri)
    return get_or_create(MlflowClient(), tracking_cfg)


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


class TrackedRun(Callback):
    def __init__(self, tracking_cfg, run_name: str | None = None, resume_run_id: str | None = None, tags: dict | None = None):
        self.cfg = tracking_cfg
        self.run_name = run_name
        self.resume_run_id = resume_run_id
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.status: str | None = None
        self._prev_handler = None
        self._secrets = redact.secret_values()
        self._logged: dict[str, int] = {}  # metric -> last step the run already has (a resumed run)

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "TrackedRun":
        azure = _azure_context()
        if azure:  # inside an Azure ML job: log into the run Azure already opened
            mlflow.set_tracking_uri(azure["tracking_uri"])
            run = mlflow.start_run(run_id=azure["run_id"])
        else:
            exp_id = setup_tracking(self.cfg)
            tags = redact.redact_mapping({k: str(v) for k, v in self.tags.items()}, self._secrets)
            if self.cfg.get("parent_run_id"):
                tags["mlflow.parentRunId"] = self.cfg.parent_run_id
            if self.resume_run_id and _resumable(self.resume_run_id):
                run = mlflow.start_run(run_id=self.resume_run_id)
                mlflow.set_tags(tags)
                self._logged = _last_steps(run.info.run_id)
            else:
                run = mlflow.start_run(experiment_id=exp_id, run_name=self.run_name or self.cfg.get("run_name"), tags=tags)
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        try:
            self._prev_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (e.g. some launchers): no handler, still ended in __exit__
            self._prev_handler = None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._prev_handler is not None:
            signal.signal(signal.SIGTERM, self._prev_handler)
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        elif _is_pruned(exc):
            status = "FINISHED"  # a pruned trial did what the sweep asked; tagged below
            mlflow.set_tag("phitune.trial_state", "pruned")
        else:
            status = "FAILED"
            mlflow.set_tag("phitune.error", redact.redact_text(failure_line(exc), self._secrets)[:5000])
        self.status = status
        mlflow.end_run(status=status)
        return False

    # -- logging -----------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        clean = redact.redact_mapping(params, self._secrets)
        items = [(k, "" if v is None else str(v)[:6000]) for k, v in clean.items()]
        client = MlflowClient()
        existing = client.get_run(self.run_id).data.params
        items = [(k, v) for k, v in items if k not in existing]  # resumed run: params already there
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            mlflow.log_params(dict(items[i:i + 100]))

    def log_text(self, text: str, artifact_file: str) -> None:
        # A YAML file (config.yaml) is masked as a tree: a secret-named key at any depth.
        yaml_file = artifact_file.endswith((".yaml", ".yml"))
        mlflow.log_text((redact.redact_yaml if yaml_file else redact.redact_text)(text, self._secrets), artifact_file)

    def set_tags(self, tags: dict) -> None:
        mlflow.set_tags(redact.redact_mapping({k: str(v) for k, v in tags.items()}, self._secrets))

    def on_step(self, step: int, metrics: dict) -> None:
        keys = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy", "learning_rate", "train_tokens",
                "train_accuracy", "valid_accuracy", "valid_macro_f1")  # the last three: task=classification
        self._log_metrics({k: metrics[k] for k in keys if k in metrics}, step)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict, checkpoint_dir) -> None:
        if metrics:
            self._log_metrics(dict(metrics, epoch=epoch), step)
        if checkpoint_dir is not None:
            # Each kept epoch is a deployable candidate, as Azure's and OpenAI's checkpoints are.
            mlflow.log_artifacts(str(Path(checkpoint_dir) / "adapter"), f"checkpoints/epoch-{epoch:03d}")
            mlflow.log_text(json.dumps(dict(metrics, epoch=epoch, step=step)), f"checkpoints/epoch-{epoch:03d}/metrics.json")
            self._checkpoint_model(epoch, step, metrics)

    def _checkpoint_model(self, epoch: int, step: int, metrics: dict) -> None:
        from phitune.tracking.pyfunc_model import log_checkpoint_model

        try:
            log_checkpoint_model(self.run_id, self.experiment_id, epoch, step, metrics)
        except mlflow.exceptions.MlflowException as exc:  # a store without LoggedModels (MLflow 2 servers)
            print(f"note: epoch {epoch} is not an MLflow LoggedModel ({str(exc.message).splitlines()[0][:200]}); "
                  f"its checkpoint is in the run's artifacts", file=sys.stderr)

    def _log_metrics(self, metrics: dict, step: int) -> None:
        # A resumed run replays the steps after its checkpoint (or all of them, killed before
        # one) with the same seed, data order and RNG state, so a point the killed process
        # already logged holds the same value: skip it rather than log the step twice.
        fresh = {k: float(v) for k, v in metrics.items() if step > self._logged.get(k, -1)}
        if fresh:
            mlflow.log_metrics(fresh, step=step)

    def log_files(self, writer, name: str, artifact_dir: str | None = None) -> None:
        """writer(path) writes a file named `name` in a temp dir; it is logged as an artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            writer(path)
            mlflow.log_artifact(str(path), artifact_dir)


def _resumable(run_id: str) -> bool:
    """The recorded run is in this store and not deleted; otherwise say so (a new run starts)."""
    try:
        info = MlflowClient().get_run(run_id).info
    except mlflow.exceptions.MlflowException:
        store = redact.redact_text(mlflow.get_tracking_uri())
        print(f"resume: MLflow run {run_id} is not in {store}; starting a new run", file=sys.stderr)
        return False
    if info.lifecycle_stage == "deleted":
        print(f"resume: MLflow run {run_id} was deleted; starting a new run", file=sys.stderr)
        return False
    return True


def _last_steps(run_id: str) -> dict[str, int]:
    client = MlflowClient()
    return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in client.get_run(run_id).data.metrics}


def _is_pruned(exc) -> bool:
    try:
        import optuna

        return isinstance(exc, optuna.TrialPruned)
    except ImportError:
        return False


def _azure_context():
    from phitune.tracking.context import azure_run_context

    return azure_run_context()
