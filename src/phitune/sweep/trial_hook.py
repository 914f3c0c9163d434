"""What a training job calls to talk to its Optuna trial, wherever it runs.

The sweeper passes `trial.storage`, `trial.study_name` and `trial.number`; the job
opens the study's storage itself, so this works in the sweeper's process (basic
launcher), in joblib's worker processes and on other machines sharing a PostgreSQL
or MySQL storage. The pruner is rebuilt from the spec the sweeper stored on the study.

    reporter = TrialReporter.from_config(cfg.trial)   # None outside a sweep
    ...
    reporter.add_tokens(n)                 # after each optimizer step
    reporter.report(valid_loss, step)      # at each evaluation; may raise optuna.TrialPruned
    ...
    reporter.finish()
"""
from __future__ import annotations

from phitune.errors import PhituneError


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

        from phitune.sweep.study import PRUNER_ATTR, build_pruner, display_url, resolve_storage_ref

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

    def add_tokens(self, n: int) -> None:
        """Count training tokens (written to the trial at each report and at finish)."""
        self._tokens += int(n)

    def report(self, value: float, step: int) -> None:
        """Record an intermediate value (valid_loss) at `step`; raise optuna.TrialPruned when the pruner says so."""
        import optuna

        self._flush()
        try:
            self.trial.report(float(value), int(step))
        except optuna.exceptions.UpdateFinishedTrialError:
            raise self._finished_elsewhere() from None
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.number} pruned at step {step} ({value:.4g})")

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

