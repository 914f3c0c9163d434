"""What a job calls to talk to its Optuna trial, wherever it runs.

The job opens the study's storage itself, so this works in the sweeper's process (basic
launcher), in joblib's worker processes and on other machines sharing a PostgreSQL or
MySQL storage. The pruner is rebuilt from the spec the sweeper stored on the study.

Any Hydra app, two lines (the trial comes from the environment, phitune.sweep.contract):

    from phitune.sweep import report
    report(val_loss, step)                 # may raise optuna.TrialPruned; no-op outside a sweep

phitune's train.py, with its `trial` node:

    reporter = TrialReporter.from_config(cfg.trial)   # None outside a sweep
    ...
    reporter.add_tokens(n)                 # after each optimizer step
    reporter.report(valid_loss, step)      # at each evaluation; may raise optuna.TrialPruned
    ...
    reporter.finish()
"""
from __future__ import annotations

import functools
import sys

from phitune.errors import PhituneError

# User attr: the step at which report(..., raise_pruned=False) said stop; the sweeper records
# the trial PRUNED even though its job returned normally.
PRUNED_AT_ATTR = "phitune.pruned_at"


class TrialReporter:
    def __init__(self, study, trial, storage, trial_id: int, number: int):
        self.study = study
        self.trial = trial
        self.number = number
        self._storage = storage
        self._trial_id = trial_id
        self._tokens = 0  # training tokens processed by this job
        self._flushed = None  # token count last written to the storage

    @classmethod
    def from_config(cls, trial_cfg) -> "TrialReporter | None":
        """None when trial.storage is unset (not in a sweep)."""
        url = trial_cfg.get("storage") if trial_cfg is not None else None
        if not url:
            return None
        name, number = trial_cfg.get("study_name"), trial_cfg.get("number")
        if name is None or number is None:
            raise PhituneError("trial.storage is set but trial.study_name or trial.number is not; "
                               "the sweeper sets all three (don't set them by hand)")
        import optuna

        from phitune.sweep.pruning import build_pruner
        from phitune.sweep.study import PRUNER_ATTR, display_url, resolve_storage_ref

        url = resolve_storage_ref(str(url))
        storage = _storage(url)
        try:
            # The job never samples: a RandomSampler keeps load_study cheap.
            study = optuna.load_study(study_name=str(name), storage=storage, sampler=optuna.samplers.RandomSampler())
        except KeyError:
            raise PhituneError(f"trial.study_name: no study {name!r} in {display_url(str(url))}") from None
        study.pruner = build_pruner(study.user_attrs.get(PRUNER_ATTR))
        try:
            trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(str(name)), int(number))
        except KeyError:
            raise PhituneError(f"trial.number: study {name!r} has no trial {number}") from None
        state = storage.get_trial(trial_id).state
        if state != optuna.trial.TrialState.RUNNING:
            raise PhituneError(f"trial {number} of study {name!r} is {state.name}, not RUNNING: "
                               "only the sweeper that asked for it can start it")
        return cls(study, optuna.trial.Trial(study, trial_id), storage, trial_id, int(number))

    @property
    def pruner_spec(self) -> dict:
        """The sweep's pruner settings (phitune.sweep.pruning.pruner_spec), as stored on the study."""
        from phitune.sweep.study import PRUNER_ATTR

        return dict(self.study.user_attrs.get(PRUNER_ATTR) or {"name": "none"})

    def plan(self, planned_tokens: int, report_tokens: int | None = None) -> None:
        """Record what this trial trains when nobody stops it, and the tokens between its report
        points (phitune.sweep.axis): the pruner's warm-up and resources, and the parent run's
        unpruned-sweep figure, are computed from them. Call it before the first report."""
        from phitune.sweep.axis import PLANNED_ATTR, REPORT_TOKENS_ATTR

        self.trial.set_user_attr(PLANNED_ATTR, int(planned_tokens))
        if report_tokens is not None:
            self.trial.set_user_attr(REPORT_TOKENS_ATTR, int(report_tokens))

    def link_run(self, run_id: str) -> None:
        """The trial's MLflow run id as a user attribute while it runs (the sweeper writes it
        again when it tells the result), so that optuna-dashboard (`phitune sweep dashboard`)
        links a running trial to its MLflow run too."""
        from phitune.sweep.study import MLFLOW_RUN_ATTR

        self.trial.set_user_attr(MLFLOW_RUN_ATTR, str(run_id))

    def add_tokens(self, n: int) -> None:
        """Count training tokens (written to the trial at each report and at finish)."""
        self._tokens += int(n)

    def report(self, value: float, step: int, raise_pruned: bool = True) -> bool:
        """Record an intermediate value (valid_loss) at `step`. When the pruner says stop: raise
        optuna.TrialPruned, or with raise_pruned=False return True (the job then ends early and the
        trial is recorded PRUNED all the same). A multi-objective study cannot prune (Optuna):
        the values are not recorded and this returns False."""
        import optuna

        if len(self.study.directions) > 1:
            _say_once("note: phitune.sweep.report: a multi-objective study is not pruned; reports are ignored")
            return False
        self._flush()
        try:
            self.trial.report(float(value), int(step))
            stop = self.trial.should_prune()
            if stop and not raise_pruned:
                self.trial.set_user_attr(PRUNED_AT_ATTR, int(step))
        except optuna.exceptions.UpdateFinishedTrialError:
            raise self._finished_elsewhere() from None
        if stop and raise_pruned:
            raise optuna.TrialPruned(f"trial {self.number} pruned at step {step} ({value:.4g})")
        return stop

    def finish(self) -> None:
        """Write the user attrs (train_tokens) a last time."""
        self._flush()

    def _flush(self) -> None:
        import optuna

        from phitune.sweep.study import TOKENS_ATTR

        if self._tokens == self._flushed:
            return
        try:
            self.trial.set_user_attr(TOKENS_ATTR, self._tokens)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise self._finished_elsewhere() from None
        self._flushed = self._tokens

    def _finished_elsewhere(self) -> PhituneError:
        state = self._storage.get_trial(self._trial_id).state.name
        return PhituneError(f"trial {self.number} is already {state}: another worker gave it up "
                            "(no heartbeat from its sweeper for the grace period); this job stops")


_STORAGES: dict = {}


def _storage(url: str):
    """One storage per URL and process: with Hydra's basic launcher every trial's job runs
    in the sweeper's process, and opening an RDBStorage costs ~0.3 s (schema checks)."""
    from phitune.sweep.study import open_storage

    if url not in _STORAGES:
        _STORAGES[url] = open_storage(url)
    return _STORAGES[url]



# -- any app: the trial from the environment -------------------------------------------------

_CURRENT: dict = {}  # (storage, study, number) -> TrialReporter, for this process's running job
_SAID: set = set()


def current_trial() -> "TrialReporter | None":
    """This job's trial, from the variables the sweeper sets (phitune.sweep.contract); None outside a sweep."""
    from phitune.sweep.contract import from_env

    ident = from_env()
    if ident is None:
        return None
    key = (ident["storage"], ident["study_name"], ident["number"])
    if key not in _CURRENT:
        _CURRENT.clear()  # one job at a time per process: the previous job's trial is over
        _CURRENT[key] = TrialReporter.from_config(ident)
    return _CURRENT[key]


def report(value: float, step: int, *, raise_pruned: bool = True) -> bool:
    """Report an intermediate value of the objective at `step` (an epoch, an evaluation) to this
    job's trial; the pruner may then stop it: optuna.TrialPruned is raised (or, with
    raise_pruned=False, True returned). Outside a sweep it does nothing and returns False."""
    reporter = current_trial()
    return False if reporter is None else reporter.report(value, step, raise_pruned=raise_pruned)


def _say_once(line: str) -> None:
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr)


class TrialTask:
    """The app's task function as the sweeper launches it (picklable for joblib's workers).

    A job that leaves an MLflow run active (mlflow.log_metric without start_run does) would make
    the next job in the same process (basic launcher, a reused joblib worker) log into that run:
    it is ended here, as the job ended. mlflow.start_run() deletes MLFLOW_RUN_ID once it has used
    it, and Hydra's restoring of hydra.job.env_set then fails on the missing key: the job's
    variables are put back first."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, cfg):
        import os

        from phitune.sweep.contract import JOB_VARS

        env = {k: os.environ[k] for k in JOB_VARS if k in os.environ}
        status = "FINISHED"
        try:
            from phitune.sweep.devices import bind

            bind()  # parallel trials on GPUs: this process's own GPU, before anything starts CUDA
            return self.fn(cfg)
        except BaseException as exc:
            status = ("FINISHED" if type(exc).__name__ == "TrialPruned" else
                      "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            _end_active_run(status)  # MLflow unsets MLFLOW_RUN_ID here too
            _CURRENT.clear()
            os.environ.update(env)


def _end_active_run(status: str) -> None:
    if "mlflow" not in sys.modules:
        return
    import mlflow

    while mlflow.active_run() is not None:  # nested runs end one by one
        mlflow.end_run(status=status)
