"""The sweep's MLflow parent run: one per study, reused when the sweep is resumed.

Everything goes through MlflowClient, never the fluent API: with Hydra's basic
launcher the jobs run in this process and open their own (fluent) active run,
which an active parent run here would collide with.
"""
from __future__ import annotations

import re
import time
import warnings

from phitune import redact
from phitune.sweep.study import PARENT_RUN_ATTR

TRIAL_TAG = "phitune.trial_number"
STATE_TAG = "phitune.trial_state"
ERROR_TAG = "phitune.error"  # as a job's own failed run has it (phitune.tracking.run)
STUDY_TAG = "phitune.study"
# How long (seconds) a worker that did not create the study waits for the creator to
# open the parent run, so that workers started together share one parent. It covers the
# creator's first connection to a new MLflow store (~5-30 s of schema migrations).
CREATOR_WAIT_S = 180
# MLflow refuses param values longer than this (characters).
MAX_PARAM_CHARS = 6000
BEST_TAG = "phitune.best"  # "true" on the run of the sweep's best trial, moved as the best changes
BEST_RUN_TAG = "phitune.best_run_id"  # on the parent: the best trial's run
BEST_MARK = "★ best"
# Run names are what MLflow's runs table shows first (about 25 characters before the cut):
# the trial, its outcome, then what it tried with short names for the portal's
# hyperparameters (`×` for a multiplier of the model's base value).
ALIASES = {"learning_rate_multiplier": "lr×", "batch_size_multiplier": "bs×", "epochs": "ep=",
           "lora.rank": "r=", "lora.alpha": "alpha=", "lora.dropout": "drop="}
MAX_NAME_CHARS = 250  # MLflow's run_name column is 250 characters
# Workers write the same tags of shared runs (the best mark, the parent's best run) at
# once; MLflow's set_tag is read-then-insert, so the loser of a race gets a duplicate
# key from PostgreSQL. It retries: the row then exists and the write is an update.
SHARED_WRITE_TRIES = 5
SHARED_WRITE_BACKOFF_S = 0.05


def trial_run_name(number: int, params: dict, state: str | None = None, step: int | None = None,
                   best: bool = False, tokens: bool = False) -> str:
    """`trial-3 lr×4.6 bs×1`, `trial-2 pruned@8 lr×0.3 bs×2`, `trial-5 ★ best lr×1.2 bs×1`;
    with tokens (steps that count training tokens) `trial-2 pruned@6.6k-tok lr×0.3 bs×2`."""
    parts = [f"trial-{number}"]
    if best:
        parts.append(BEST_MARK)
    if state in ("pruned", "failed", "killed"):
        at = f"{step / 1000:.2g}k-tok" if tokens and step is not None and step >= 1000 else (
            f"{step}-tok" if tokens else f"{step}")
        parts.append(f"pruned@{at}" if state == "pruned" and step is not None else state)
    parts += [_short_param(k, v) for k, v in params.items()]
    return " ".join(parts)[:MAX_NAME_CHARS]


def _short_param(name: str, value) -> str:
    key = str(name).lstrip("+~")
    key = key[len("train."):] if key.startswith("train.") else key
    alias = ALIASES.get(key) or f"{key.rsplit('.', 1)[-1]}="
    if isinstance(value, float) and not isinstance(value, bool):
        value = f"{value:.2g}"  # 4.6, 0.25, 1: enough to tell trials apart; the params hold the rest
    return f"{alias}{value}"


def mlflow_key(name: str) -> str:
    """A param or tag name as MLflow allows it: `+w` -> `_w` (alphanumerics, _ - . space / : only)."""
    return re.sub(r"[^\w\-. /:]", "_", str(name))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    redact.quiet_mlflow_url(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(tracking_cfg) -> str:
    """Get or create the experiment phitune's jobs use (phitune.tracking.experiment, torch-free)."""
    from phitune.tracking.experiment import get_or_create

    return get_or_create(_client(tracking_cfg.uri), tracking_cfg)


class ParentRun:
    def __init__(self, tracking_cfg, run_id: str, exp_id: str, resumed: bool):
        self.uri = tracking_cfg.uri
        self.client = _client(self.uri)
        self.run_id = run_id
        self.experiment_id = exp_id
        self.resumed = resumed

    @classmethod
    def open(cls, tracking_cfg, study, sweep_name: str, created_study: bool) -> "ParentRun":
        """The study's parent run: reused if the study names one that exists, else created.

        A worker that joins a new study waits for its creator's parent run before it opens
        the MLflow store: MLflow migrates a new database's schema on first use, and two
        processes migrating one PostgreSQL database at once collide."""
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is None and not created_study and not study.get_trials(deepcopy=False):
            run_id = _wait_for_parent(study)
        exp_id = experiment_id(tracking_cfg)
        client = _client(tracking_cfg.uri)
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
                _shared_write(self.client.set_tag, self.run_id, f"phitune.now.{key}", text[:MAX_PARAM_CHARS])

    def set_tag(self, key: str, value) -> None:
        _shared_write(self.client.set_tag, self.run_id, key, redact.redact_text(str(value))[:MAX_PARAM_CHARS])

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.client.log_metric(self.run_id, key, float(value), step=step)

    def find_child(self, number: int):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`{TRIAL_TAG}` = '{number}'",
            max_results=5, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def start_child(self, number: int, study_name: str, params: dict) -> str:
        """A trial's child run opened for an app that does not open one itself (no phitune
        `tracking` node): the job's own mlflow.start_run() resumes it through MLFLOW_RUN_ID."""
        run = self.client.create_run(self.experiment_id, run_name=trial_run_name(number, params), tags={
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

    def mark_child(self, run, state: str, name: str | None = None) -> None:
        """Tag the trial's run with its state if the job did not, name it (trial_run_name: the
        outcome shows in the runs table) and end a run the job left RUNNING."""
        if run is None:
            return
        if STATE_TAG not in run.data.tags:
            self.client.set_tag(run.info.run_id, STATE_TAG, state)
        if name and name != run.info.run_name:
            self.client.update_run(run.info.run_id, name=name)
        if run.info.status == "RUNNING":
            status = {"failed": "FAILED", "killed": "KILLED"}.get(state, "FINISHED")
            self.client.set_terminated(run.info.run_id, status=status)

    def mark_best(self, run, name: str) -> None:
        """Move the best mark (BEST_TAG, BEST_MARK in the name, BEST_RUN_TAG on the parent) to `run`."""
        if run is None:
            return
        marked = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`{BEST_TAG}` = 'true'")
        for old in marked:
            if old.info.run_id != run.info.run_id:
                _shared_write(self.client.delete_tag, old.info.run_id, BEST_TAG, gone_ok=True)
                plain = " ".join(old.info.run_name.replace(BEST_MARK, "").split())
                self.client.update_run(old.info.run_id, name=plain)
        _shared_write(self.client.set_tag, run.info.run_id, BEST_TAG, "true")
        if name != run.info.run_name:
            self.client.update_run(run.info.run_id, name=name)
        _shared_write(self.client.set_tag, self.run_id, BEST_RUN_TAG, run.info.run_id)

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
                if STATE_TAG not in run.data.tags:  # another worker may close the same orphan
                    _shared_write(self.client.set_tag, run.info.run_id, STATE_TAG, "killed")
                if (errors or {}).get(int(number)) and ERROR_TAG not in run.data.tags:
                    _shared_write(self.client.set_tag, run.info.run_id, ERROR_TAG,
                                  redact.redact_text(errors[int(number)])[:5000])
                self.client.set_terminated(run.info.run_id, status="KILLED")
                closed += 1
        return closed

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _shared_write(write, run_id: str, *args, gone_ok: bool = False) -> None:
    """`write(run_id, *args)` on a run other workers write too: retried when a concurrent
    insert of the same key wins the race; with gone_ok, a tag another worker already
    deleted is no error."""
    from mlflow.exceptions import MlflowException

    for attempt in range(SHARED_WRITE_TRIES):
        try:
            with warnings.catch_warnings():  # SQLAlchemy's note when the other worker deleted first
                warnings.filterwarnings("ignore", message=".*expected to delete")
                write(run_id, *args)
            return
        except MlflowException as err:
            text = str(err)
            if gone_ok and "No tag with name" in text:
                return
            if attempt == SHARED_WRITE_TRIES - 1 or not ("duplicate key" in text or "UNIQUE constraint" in text):
                raise
            time.sleep(SHARED_WRITE_BACKOFF_S * (attempt + 1))


def _exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


def _wait_for_parent(study) -> str | None:
    """The parent run id once the study's creator has set it; None after CREATOR_WAIT_S
    (the creator died before opening it: this worker opens one)."""
    deadline = time.monotonic() + CREATOR_WAIT_S
    while time.monotonic() < deadline:
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id:
            return run_id
        time.sleep(0.5)  # seconds; the creator is opening the MLflow store
    print(f"sweep: no MLflow parent run from the worker that created study {study.study_name!r} "
          f"after {CREATOR_WAIT_S} s; this worker opens one")
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
