"""The sweep's MLflow parent run: one per study, reused when the sweep is resumed.

Everything goes through MlflowClient, never the fluent API: with Hydra's basic
launcher the jobs run in this process and open their own (fluent) active run,
which an active parent run here would collide with.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from phitune import redact
from phitune.sweep.study import PARENT_RUN_ATTR

TRIAL_TAG = "phitune.trial_number"
STATE_TAG = "phitune.trial_state"
ERROR_TAG = "phitune.error"  # as a job's own failed run has it (phitune.tracking.run)
STUDY_TAG = "phitune.study"
# How long (seconds) a worker that did not create the study waits for the creator to
# open the parent run, so that two workers started together share one parent.
CREATOR_WAIT_S = 60
# MLflow refuses param values longer than this (characters).
MAX_PARAM_CHARS = 6000


def mlflow_key(name: str) -> str:
    """A param or tag name as MLflow allows it: `+w` -> `_w` (alphanumerics, _ - . space / : only)."""
    return re.sub(r"[^\w\-. /:]", "_", str(name))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    redact.quiet_mlflow_url(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(tracking_cfg) -> str:
    """Get or create the experiment with the artifact location phitune's jobs use.

    Same rule as phitune.tracking.run.setup_tracking (artifacts beside a sqlite db),
    without importing that module: it pulls in torch, which the sweeper itself does
    not need.
    """
    import mlflow

    client = _client(tracking_cfg.uri)
    exp = client.get_experiment_by_name(tracking_cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    root = tracking_cfg.get("artifact_root") or _sqlite_artifact_root(tracking_cfg.uri)
    location = f"{root.rstrip('/')}/{tracking_cfg.experiment}" if root else None
    try:
        return client.create_experiment(tracking_cfg.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another worker
        return client.get_experiment_by_name(tracking_cfg.experiment).experiment_id


def _sqlite_artifact_root(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return (db.parent.resolve() / "artifacts").as_uri()


class ParentRun:
    def __init__(self, tracking_cfg, run_id: str, exp_id: str, resumed: bool):
        self.uri = tracking_cfg.uri
        self.client = _client(self.uri)
        self.run_id = run_id
        self.experiment_id = exp_id
        self.resumed = resumed

    @classmethod
    def open(cls, tracking_cfg, study, sweep_name: str, created_study: bool) -> "ParentRun":
        """The study's parent run: reused if the study names one that exists, else created."""
        exp_id = experiment_id(tracking_cfg)
        client = _client(tracking_cfg.uri)
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is None and not created_study:
            run_id = _wait_for_parent(study)
        if run_id is not None and _exists(client, run_id):
            client.update_run(run_id, status="RUNNING")
            return cls(tracking_cfg, run_id, exp_id, resumed=True)
        run = client.create_run(exp_id, run_name=f"sweep-{study.study_name}",
                                tags=redact.redact_mapping({STUDY_TAG: study.study_name, "phitune.sweep": sweep_name,
                                                            "phitune.role": "sweep"}))
        study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
        return cls(tracking_cfg, run.info.run_id, exp_id, resumed=False)

    def log_params(self, params: dict) -> None:
        """Params are immutable in MLflow: a resumed sweep adds new keys and keeps the first values."""
        existing = self.client.get_run(self.run_id).data.params
        for key, value in redact.redact_mapping(params).items():
            key = mlflow_key(key)  # e.g. no '@'
            text = "" if value is None else str(value)[:MAX_PARAM_CHARS]
            if key not in existing:
                self.client.log_param(self.run_id, key, text)
            elif existing[key] != text:
                self.client.set_tag(self.run_id, f"phitune.now.{key}", text[:MAX_PARAM_CHARS])

    def set_tag(self, key: str, value) -> None:
        self.client.set_tag(self.run_id, key, redact.redact_text(str(value))[:MAX_PARAM_CHARS])

    def find_child(self, number: int):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`{TRIAL_TAG}` = '{number}'",
            max_results=5, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def start_child(self, number: int, study_name: str, params: dict) -> str:
        """A trial's child run opened for an app that does not open one itself (no phitune
        `tracking` node): the job's own mlflow.start_run() resumes it through MLFLOW_RUN_ID."""
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags={
            "mlflow.parentRunId": self.run_id, TRIAL_TAG: str(number), STUDY_TAG: study_name})
        for key, value in redact.redact_mapping(dict(params)).items():
            self.client.log_param(run.info.run_id, mlflow_key(key), str(value)[:MAX_PARAM_CHARS])
        return run.info.run_id

    def log_objective(self, run, names: list[str], values: list[float]) -> None:
        """The trial's objective on its child run, unless the job logged a metric of that name."""
        if run is None:
            return
        for name, value in zip(names, values):
            if name not in run.data.metrics:
                self.client.log_metric(run.info.run_id, name, float(value))

    def mark_child(self, run, state: str) -> None:
        """Tag the trial's run with its state if the job did not, and end a run the job left RUNNING."""
        if run is None:
            return
        if STATE_TAG not in run.data.tags:
            self.client.set_tag(run.info.run_id, STATE_TAG, state)
        if run.info.status == "RUNNING":
            status = {"failed": "FAILED", "killed": "KILLED"}.get(state, "FINISHED")
            self.client.set_terminated(run.info.run_id, status=status)

    def close_orphans(self, finished_numbers: set[int], errors: dict[int, str] | None = None) -> int:
        """End child runs left RUNNING by a killed worker (SIGKILL ends no run) whose trial
        the study has since finished: KILLED, tagged `killed` and with the trial's error
        (e.g. no heartbeat) as `phitune.error`. Returns how many."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'")
        closed = 0
        for run in runs:
            number = run.data.tags.get(TRIAL_TAG)
            if number is not None and number.isdigit() and int(number) in finished_numbers:
                if STATE_TAG not in run.data.tags:
                    self.client.set_tag(run.info.run_id, STATE_TAG, "killed")
                if (errors or {}).get(int(number)) and ERROR_TAG not in run.data.tags:
                    self.client.set_tag(run.info.run_id, ERROR_TAG, redact.redact_text(errors[int(number)])[:5000])
                self.client.set_terminated(run.info.run_id, status="KILLED")
                closed += 1
        return closed

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


def _wait_for_parent(study) -> str | None:
    deadline = time.monotonic() + CREATOR_WAIT_S
    while time.monotonic() < deadline:
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id:
            return run_id
        time.sleep(0.5)  # seconds; the creator is opening the MLflow store
    return None


def end_stray_fluent_run() -> None:
    """A job in this process that left its fluent run active would make the next job's
    start_run fail ("Run ... is already active"): end it as FAILED."""
    import sys

    if "mlflow" not in sys.modules:
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED")
