"""The sweep loop behind `python train.py -m`: ask, launch, tell, until the study is full.

One invocation is one worker. Several workers (re-runs after a crash, parallel
machines on a shared PostgreSQL/MySQL storage) cooperate through the study:

    loop
      study full (finished trials >= n_trials)        -> done
      token budget, timeout, target or cost reached   -> stop, no new trial
      every slot taken by other workers' trials       -> wait for them (failing stale ones)
      ask a batch (n_jobs), launch it, tell each outcome, print a progress line
      too many failures                               -> stop with an error

A trial left RUNNING by a dead worker stops getting heartbeats; grace_period seconds
later any worker marks it FAILED and enqueues the same params again (max_retries).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from phitune import redact
from phitune.errors import PhituneError
from phitune.sweep import contract, cost, devices, pruning
from phitune.sweep import space as sp
from phitune.sweep import study as st
from phitune.sweep.axis import REPORT_TOKENS_ATTR
from phitune.sweep.heartbeat import Heartbeat
from phitune.sweep.parent import ParentRun, STUDY_TAG, end_stray_fluent_run, trial_run_name
from phitune.sweep.plan import SweepPlan, plan_sweep
from phitune.sweep.progress import outcome_line, progress_line
from phitune.sweep.settings import DEFAULT_STORAGE
from phitune.tracking.experiment import ui_url


class SweepStopped(PhituneError):
    """The sweep stopped early on purpose (too many failures); the message says why."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: running trials were FAILED and re-enqueued; re-run to continue."""


# -- the loop --------------------------------------------------------------------------------

@dataclass
class SweepContext:
    """What the Hydra plugin hands over."""

    settings: DictConfig  # hydra.sweeper.*
    config: DictConfig  # the composed config (with its hydra node)
    launcher: Any  # hydra Launcher
    validate: Callable[[list[list[str]]], None]  # Sweeper.validate_batch_is_legal


def run_sweep(ctx: SweepContext, arguments: list[str]) -> list:
    from phitune import backends, preflight

    # First, before a study, an MLflow run or a request exists: can this backend sweep at all?
    backend = backends.lookup(OmegaConf.select(ctx.config, "backend.name", default=None) or "local", "sweep",
                              OmegaConf.select(ctx.config, "task.name", default=None) or "chat")
    s = ctx.settings
    plan = plan_sweep(s.params, arguments)
    if not plan.space:
        raise PhituneError("nothing to sweep: hydra.sweeper.params is empty and the command line has no search space "
                           "(e.g. 'train.epochs=range(1,4)' or sweep=NAME)")

    if backend.sweep == "azure":
        cost.refuse_on_azure(s)  # Azure has its own budget, checked before submitting
        return _submit_to_azure(ctx, plan)
    cost.cost_rule(s)  # a bad price fails before a study or a run exists

    phitune_app = contract.has_trial_nodes(ctx.config)
    tracking = sweep_tracking(ctx, phitune_app)
    preflight.check_tracking(tracking)  # the parent run opens there before any trial
    configure = custom_search_space(s.get("custom_search_space"))
    contract.declare_env(ctx.config, phitune_app, str(tracking.uri))
    _validate(ctx, plan, phitune_app, configure)
    return Sweep(ctx, plan, phitune_app, tracking, configure).run()


def sweep_tracking(ctx: SweepContext, phitune_app: bool) -> DictConfig:
    """Where the parent run and the trials' runs go: phitune's train.py has its `tracking` node;
    any other app hydra.sweeper.tracking, else $MLFLOW_TRACKING_URI, else phitune's default store."""
    import os

    from phitune.models.uri import tracking_uri

    own = ctx.settings.get("tracking") or {}
    if phitune_app:
        if own.get("uri") and own.get("uri") != ctx.config.tracking.uri:
            raise PhituneError("hydra.sweeper.tracking.uri is for apps without a `tracking` node; this app has one: "
                               "set tracking.uri instead")
        return ctx.config.tracking
    # Absolute: jobs may run in another folder (hydra.job.chdir=true).
    uri = st.absolute_storage_url(tracking_uri(own.get("uri")))
    experiment = (own.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                  or OmegaConf.select(ctx.config, "hydra.job.name", default=None) or "sweep")
    return OmegaConf.create({"uri": uri, "experiment": str(experiment), "artifact_root": None})


def custom_search_space(dotpath: str | None) -> Callable | None:
    """hydra.sweeper.custom_search_space: a dotpath to `configure(cfg, trial)` (a module next to
    the app's script, as Hydra's own dotpaths)."""
    if not dotpath:
        return None
    from hydra.utils import get_method

    try:
        return get_method(str(dotpath))
    except Exception as exc:
        raise PhituneError(f"hydra.sweeper.custom_search_space={dotpath}: cannot import it "
                           f"({' '.join(str(exc).split())[:300]})") from None


def parse_directions(direction) -> list[str]:
    """`minimize`, `maximize`, or a list of them (one per objective the job returns)."""
    from omegaconf import ListConfig

    many = isinstance(direction, (list, tuple, ListConfig))
    out = [str(getattr(d, "name", d)).strip().lower() for d in (direction if many else [direction])]
    if not out or any(d not in ("minimize", "maximize") for d in out):
        shown = (OmegaConf.to_container(direction) if isinstance(direction, ListConfig) else list(direction)) if many \
            else direction
        raise PhituneError(f"hydra.sweeper.direction={shown!r}: "
                           "expected minimize or maximize, or a list of them (one per objective)")
    return out


def objective_values(result, n: int) -> tuple[list[float] | None, str | None]:
    """The job's return value as n floats, or why it is not: (values, None) or (None, error)."""
    try:
        values = [float(result)] if n == 1 else [float(v) for v in result]
    except (TypeError, ValueError):
        want = "a number" if n == 1 else f"a sequence of {n} numbers (hydra.sweeper.direction has {n})"
        return None, f"the job returned {result!r}, not {want}"
    if len(values) != n:
        return None, f"the job returned {len(values)} values; hydra.sweeper.direction has {n}"
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        return None, f"the objective is {bad[0]} (training diverged?)"
    return values, None


def _submit_to_azure(ctx: SweepContext, plan: SweepPlan):
    try:
        from phitune.azure.sweep_job import submit_sweep
    except ImportError as exc:
        if getattr(exc, "name", "") and not str(getattr(exc, "name", "")).startswith("phitune.azure"):
            raise
        raise PhituneError("backend=azureml: sweeps on Azure ML need phitune.azure.sweep_job, "
                           "which this installation does not have") from None
    task_cfg = OmegaConf.masked_copy(ctx.config, [k for k in ctx.config.keys() if k != "hydra"])
    # plan.fixed: the command line's plain overrides plus the sweep file's plain params,
    # which every Azure trial must get too.
    return submit_sweep(task_cfg, dict(plan.space_text), ctx.settings, overrides=list(plan.fixed))


def _validate(ctx: SweepContext, plan: SweepPlan, phitune_app: bool, configure: Callable | None) -> None:
    """Compose one trial's overrides before anything is created, so a misspelt
    parameter fails now with Hydra's message, not as N failed trials."""
    sample = list(plan.fixed)
    for name, dist in plan.space.items():
        sample.append(f"{plan.launch_keys[name]}={sp.format_value(_some_value(dist))}")
    for name, value in _custom_sample(ctx, plan, configure).items():
        sample.append(f"{name}={sp.format_value(value)}")
    sample += contract.trial_overrides(phitune_app, "sqlite:///:memory:", "validate", 0, "0" * 32)
    try:
        ctx.validate([sample])
    except Exception as exc:  # ConfigCompositionException, missing keys, bad types...
        raise PhituneError(f"the sweep's overrides do not fit the config: {' '.join(str(exc).split())}") from None


def _custom_sample(ctx: SweepContext, plan: SweepPlan, configure: Callable | None) -> dict:
    """What custom_search_space adds to one trial, tried on a throwaway in-memory study."""
    if configure is None:
        return {}
    import optuna

    st.quiet_optuna()
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    for name, dist in plan.space.items():
        sp.suggest(trial, name, dist)
    try:
        configure(ctx.config, trial)
    except Exception as exc:
        raise PhituneError(f"hydra.sweeper.custom_search_space={ctx.settings.custom_search_space} failed on a sample "
                           f"trial: {type(exc).__name__}: {exc}") from None
    return {k: v for k, v in trial.params.items() if k not in plan.space}


def _some_value(dist):
    return dist.choices[0] if hasattr(dist, "choices") else dist.low


class Sweep:
    def __init__(self, ctx: SweepContext, plan: SweepPlan, phitune_app: bool = True, tracking: DictConfig | None = None,
                 configure: Callable | None = None):
        self.ctx, self.plan, self.s = ctx, plan, ctx.settings
        self.phitune_app, self.configure = phitune_app, configure
        self.tracking = tracking if tracking is not None else ctx.config.tracking
        self.directions = parse_directions(self.s.direction)
        self.metric = str(self.s.get("metric") or ("full_valid_loss" if phitune_app else "objective"))
        self.sweep_dir = Path(str(ctx.config.hydra.sweep.dir))
        self.sweep_name = str(OmegaConf.select(ctx.config, "hydra.runtime.choices.sweep", default=None) or "sweep")
        experiment = str(OmegaConf.select(ctx.config, "tracking.experiment", default=None) or "phitune")
        default_name = (f"{experiment}-{self.sweep_name}" if phitune_app else
                        str(OmegaConf.select(ctx.config, "hydra.job.name", default=None) or "sweep"))
        self.study_name = str(self.s.study_name or default_name)
        storage = self.s.storage
        if not storage:  # the Hydra Optuna sweeper's in-memory study: here a file, so that a re-run resumes
            storage = DEFAULT_STORAGE
            print(f"note: hydra.sweeper.storage is null: study {self.study_name!r} is kept in "
                  f"{st.absolute_storage_url(storage)}, so re-running this command resumes it "
                  "(set hydra.sweeper.storage to use another database)", file=sys.stderr)
        if ":memory:" in str(storage):
            raise PhituneError("hydra.sweeper.storage: an in-memory database cannot be shared with the jobs; "
                               "use a file (sqlite:///mlruns/optuna.db) or a database server")
        self.url = st.absolute_storage_url(str(storage))
        self.job_storage = st.job_storage_ref(self.url)  # `env:NAME` if the URL has a password
        self.job_fixed = hide_secret_overrides(self.plan.fixed)  # e.g. tracking.uri with a password
        _hide_secret_hydra_overrides(ctx.config)  # e.g. hydra.sweeper.storage with a password
        self.pruner_spec = pruning.pruner_spec(self.s.pruner)
        if not 0.0 <= float(self.s.max_failure_rate) <= 1.0:
            raise PhituneError(f"hydra.sweeper.max_failure_rate={self.s.max_failure_rate}: expected 0..1")
        self.n_jobs = batch_size(self.s.n_jobs, OmegaConf.select(ctx.config, "hydra.launcher.n_jobs", default=None))
        launcher_target = OmegaConf.select(ctx.config, "hydra.launcher._target_", default=None)
        self.scheduled = is_scheduler_launcher(launcher_target)
        # several trials at once on a GPU box: one GPU each (phitune.sweep.devices); a scheduler's
        # jobs run on its nodes, which it gives GPUs itself (hydra.launcher.gpus_per_node)
        self.devices = None if self.scheduled else devices.for_sweep(
            self.n_jobs, launcher_target, OmegaConf.select(ctx.config, "backend.device", default=None))
        if self.devices:
            contract.declare(ctx.config, [devices.CUDA_ENV, devices.ENV_DEVICES, devices.ENV_LOCKS])
            print(f"sweep: {self.n_jobs} trials at once, one GPU each "
                  f"({devices.CUDA_ENV} from {','.join(self.devices)})")
        self.n_trials = int(self.s.n_trials)
        if self.n_trials < 1:
            raise PhituneError(f"hydra.sweeper.n_trials={self.n_trials}: expected 1 or more")
        sampler = st.sampler_choice(self.s.sampler)
        if sampler.name == "grid":
            size = st.grid_size(plan.space)
            if size < self.n_trials:
                print(f"sweep: the grid has {size} points; n_trials {self.n_trials} -> {size}")
                self.n_trials = size
        self.per_trial_seed = sampler.name in ("tpe", "random") and sampler.kwargs.get("seed") is not None
        self.target = stop_target(self.s, self.directions)
        self.cost = cost.cost_rule(self.s)
        self.job_idx = 0
        self.cost_stop: str | None = None  # why _ask_batch started no trial (stop.max_cost)
        self.returns: list = []
        self.in_flight: dict[int, Any] = {}  # trial number -> optuna Trial
        self.trial_ids: dict[int, int] = {}  # trial number -> storage trial id (for heartbeats)

    # -- set-up ------------------------------------------------------------------------
    def _open_study(self):
        import optuna

        retry = st.retry_callback(int(self.s.max_retries))
        self.storage = st.open_storage(self.url, self.s.heartbeat_interval, self.s.grace_period, stale_callback=retry)
        self.retry = retry
        sampler = st.make_sampler(self.s.sampler, self.plan.space)
        pruner = pruning.build_pruner(self.pruner_spec)
        try:
            study = optuna.create_study(storage=self.storage, study_name=self.study_name, directions=self.directions,
                                        sampler=sampler, pruner=pruner)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage, sampler=sampler, pruner=pruner)
            created = False
            was = [d.name.lower() for d in study.directions]
            if was != self.directions:
                raise PhituneError(f"study {self.study_name!r} was created to {' and '.join(was)}, "
                                   f"not {' and '.join(self.directions)}: set hydra.sweeper.study_name to start "
                                   "a new study") from None
        # Current settings win on resume; jobs rebuild the pruner from this attr.
        study.set_user_attr(st.PRUNER_ATTR, self.pruner_spec)
        study.set_user_attr(st.SPACE_ATTR, dict(self.plan.space_text))
        study.set_user_attr(st.N_TRIALS_ATTR, self.n_trials)
        self.study = study
        self.study_id = self.storage.get_study_id_from_name(self.study_name)
        return created

    def _open_parent(self, created: bool) -> None:
        self.parent = ParentRun.open(self.tracking, self.study, self.sweep_name, created)
        self.parent.log_params({
            "study_name": self.study_name, "storage": st.display_url(self.url),
            "direction": self.directions[0] if len(self.directions) == 1 else ",".join(self.directions),
            "n_trials": self.n_trials, "sampler": st.describe_sampler(self.s.sampler),
            "pruner": st.describe_pruner(self.pruner_spec), "metric": self.metric,
            "search_space": sp.describe(self.plan.space_text),
            **{f"space.{k}": v for k, v in self.plan.space_text.items()},
            "fixed_overrides": " ".join(redact.redact_overrides(self.plan.fixed)),
            **({"stop.price_per_gpu_hour": f"{self.cost.price_per_gpu_hour:g} {self.cost.currency}",
                "stop.max_cost": self.cost.max_cost} if self.cost else {}),
        })

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> list:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        # The command line is in it (hydra.overrides.task): a URL's password is masked.
        (self.sweep_dir / "multirun.yaml").write_text(redact.redact_yaml(OmegaConf.to_yaml(self.ctx.config)))
        created = self._open_study()
        self._open_parent(created)
        self._recover()
        counts = self._counts()
        print(f"sweep {self.study_name}: {counts.finished}/{self.n_trials} trials done"
              f"{' (resumed)' if not created else ''} · sampler {st.describe_sampler(self.s.sampler)}"
              f" · pruner {st.describe_pruner(self.pruner_spec)} · storage {st.display_url(self.url)}"
              f" · MLflow parent run {self.parent.run_id}")
        print(f"  search space: {sp.describe(self.plan.space_text)}")
        if self.plan.fixed:
            print(f"  every trial: {' '.join(redact.redact_overrides(self.plan.fixed))}")

        started = time.monotonic()
        stop_reason, status = None, "FINISHED"
        try:
            beats = st.has_heartbeats(self.storage)
            if not beats:
                print("  note: a journal storage has no heartbeats: a trial whose worker dies stays RUNNING; "
                      "after a crash, set hydra.sweeper.n_trials higher or start a new study")
            with Heartbeat(self.storage, self.s.heartbeat_interval if beats else None) as self.hb:
                stop_reason = self._loop(started)
        except (KeyboardInterrupt, SweepInterrupted):
            self._interrupted()
            raise SweepInterrupted() from None
        except SweepStopped as exc:
            stop_reason, status = str(exc), "FAILED"
            self._finish(stop_reason, status)
            raise
        self._finish(stop_reason, status)
        return self.returns

    def _loop(self, started: float) -> str | None:
        waiting_said = False
        while True:
            counts = self._counts()
            if counts.finished >= self.n_trials:
                return None
            reason = self._budget_spent(counts, started)
            if reason:
                print(f"sweep: {reason}; no new trial starts")
                return reason
            free = self.n_trials - counts.allocated + counts.waiting
            if free <= 0:
                if not waiting_said:
                    print(f"sweep: all {self.n_trials} trials are taken; waiting for {counts.running} running trial(s) "
                          f"of other workers, or of a process that died (retried after {self.s.grace_period} s "
                          "without a heartbeat)")
                    waiting_said = True
                time.sleep(min(5.0, max(1.0, float(self.s.heartbeat_interval or 5))))
                self._recover()
                continue
            waiting_said = False
            self._recover()  # a dead worker's trial goes back in the queue before new ones are asked
            batch = self._ask_batch(min(self.n_jobs, free))
            if not batch and self.cost_stop:
                print(f"sweep: {self.cost_stop}; no new trial starts")
                return self.cost_stop
            if batch:
                self._launch(batch)
                self._check_failures()

    def _recover(self) -> None:
        """FAIL the RUNNING trials whose worker stopped beating (the storage's callback
        re-enqueues them) and end their MLflow runs, which a SIGKILL left RUNNING."""
        import optuna

        st.fail_stale_trials(self.study, int(self.s.max_retries))  # each with its reason in user attr `error`
        failed = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        if failed:
            self.parent.close_orphans({t.number for t in failed},
                                      errors={t.number: t.user_attrs.get(st.ERROR_ATTR) for t in failed})

    def _frozen(self, number: int):
        return self.study.get_trials(deepcopy=False)[number]  # trials are listed by number

    def _counts(self):
        return st.count_trials(self.study.get_trials(deepcopy=False))

    def _budget_spent(self, counts, started: float) -> str | None:
        if self.s.max_total_tokens is not None and counts.tokens >= int(self.s.max_total_tokens):
            return f"token budget spent ({counts.tokens:,} of {int(self.s.max_total_tokens):,} training tokens)"
        if self.s.timeout is not None and time.monotonic() - started >= float(self.s.timeout):
            return f"timeout reached ({float(self.s.timeout):g} s)"
        return self._target_reached()

    def _target_reached(self) -> str | None:
        best = st.best_trial(self.study) if self.target is not None else None
        if best is None:
            return None
        minimize = self.directions[0] == "minimize"
        if (best.value <= self.target) if minimize else (best.value >= self.target):
            return (f"target reached (best {self.metric} {best.value:.4g} of trial {best.number} "
                    f"{'<=' if minimize else '>='} hydra.sweeper.stop.target={self.target:g})")
        return None

    def _ask_batch(self, n: int) -> list:
        """Up to n trials; with stop.max_cost, only those that fit (self.cost_stop says why not)."""
        batch = []
        self.cost_stop = None
        for _ in range(n):
            verdict = cost.check(self.study.get_trials(deepcopy=False), self.cost) if self._cost_stops() else None
            if verdict is not None and not verdict.fits:
                # Mid-batch, the trials asked so far run; the next loop decides on their measured cost.
                self.cost_stop = verdict.line(self.cost, "stopping: the next trial would pass max_cost")
                break
            trial = self._ask()
            if trial is not None:
                if verdict is not None:
                    print(f"sweep: {verdict.line(self.cost, f'starting trial {trial.number}')}", flush=True)
                batch.append(trial)
        return batch

    def _cost_stops(self) -> bool:
        return self.cost is not None and self.cost.max_cost is not None

    def _ask(self):
        """One new (or re-enqueued) trial with its params, or None if it came too late."""
        import optuna

        from phitune.sweep.study import DISCARDED_ATTR

        if self.per_trial_seed:
            self.study.sampler = st.make_sampler(self.s.sampler, self.plan.space, len(self.study.get_trials(deepcopy=False)))
        trial = self.study.ask()
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
        self.hb.add(trial_id)
        self.in_flight[trial.number] = trial
        self.trial_ids[trial.number] = trial_id
        trials = self.study.get_trials(deepcopy=False)
        if st.slot_of(trials, trial.number) >= self.n_trials:
            # Another worker took the last slot between our count and our ask.
            trial.set_user_attr(DISCARDED_ATTR, True)
            self._tell(trial, optuna.trial.TrialState.FAIL)
            return None
        if self.per_trial_seed:
            self.study.sampler = st.make_sampler(self.s.sampler, self.plan.space, trial.number)
        try:
            for name, dist in self.plan.space.items():
                sp.suggest(trial, name, dist)
        except ValueError as exc:  # a re-enqueued trial whose value no longer fits the space
            trial.set_user_attr(st.ERROR_ATTR, f"search space changed: {exc}")
            self._tell(trial, optuna.trial.TrialState.FAIL)
            print(outcome_line(trial.number, "failed", error=f"search space changed since it was enqueued: {exc}"))
            return None
        if self.configure is not None:
            try:
                self.configure(self.ctx.config, trial)
            except Exception as exc:
                error = f"hydra.sweeper.custom_search_space={self.s.custom_search_space}: {type(exc).__name__}: {exc}"
                trial.set_user_attr(st.ERROR_ATTR, error[:2000])
                self._tell(trial, optuna.trial.TrialState.FAIL)
                raise SweepStopped(error) from None
        return trial

    def _overrides(self, trial) -> list[str]:
        ov = list(self.job_fixed)
        # custom_search_space's params after the space's; their name is their override key (`+w`).
        names = list(self.plan.space) + [n for n in trial.params if n not in self.plan.space]
        for name in names:
            ov.append(f"{self.plan.launch_keys.get(name, name)}={sp.format_value(trial.params[name])}")
        if self.phitune_app and not any(o.lstrip("+~").startswith("tracking.run_name=") for o in ov):
            # `++`: an app with phitune's job side may lack the key (it names its own run, or not).
            ov.append(f"++tracking.run_name={sp.quote(trial_run_name(trial.number, trial.params))}")
        mlflow_env = None
        if not self.phitune_app:  # its child run, opened here; phitune's train.py opens its own
            child = self.parent.start_child(trial.number, self.study_name, trial.params)
            mlflow_env = contract.mlflow_env(str(self.tracking.uri), self.parent.experiment_id, child)
        return ov + contract.trial_overrides(self.phitune_app, self.job_storage, self.study_name, trial.number,
                                             self.parent.run_id, mlflow_env)

    def _launch(self, batch: list) -> None:
        numbers = [t.number for t in batch]
        # Hydra's job number names the job's folder: make it the trial number when it can be.
        consecutive = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        idx = numbers[0] if consecutive else self.job_idx
        overrides = [self._overrides(t) for t in batch]
        if self.devices:
            lock_dir = str((self.sweep_dir / ".devices").resolve())
            for ov, gpu in zip(overrides, devices.assign(len(batch), self.devices)):
                ov += [contract.env_override(devices.CUDA_ENV, gpu),
                       contract.env_override(devices.ENV_DEVICES, ",".join(self.devices)),
                       contract.env_override(devices.ENV_LOCKS, lock_dir)]
        try:
            outcomes = self._run_jobs(overrides, idx)
        finally:
            end_stray_fluent_run()
        self.job_idx = max(self.job_idx, idx + len(batch))
        self.returns.append([_failed_return(o) if isinstance(o, BaseException) else o for o in outcomes])
        for trial, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException) and job_died(outcome):
                self._requeue_killed(trial, outcome)
            else:
                self._conclude(trial, _failed_return(outcome) if isinstance(outcome, BaseException) else outcome)

    def _run_jobs(self, overrides: list[list[str]], idx: int) -> list:
        """Each job's JobReturn, or the exception that stands for it.

        A submitit launcher waits for its whole array and raises when any job died: each trial
        of a batch is submitted on its own there, so one killed job costs no other its result."""
        def launch(ovs, first):
            try:
                return list(self.ctx.launcher.launch(ovs, initial_job_idx=first))
            except Exception as exc:  # the launcher broke (a joblib worker crashed, a job was killed)
                return [exc] * len(ovs)

        if not self.scheduled or len(overrides) == 1:
            return launch(overrides, idx)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(overrides)) as pool:  # threads only wait on the scheduler
            return [r[0] for r in pool.map(lambda i: launch([overrides[i]], idx + i), range(len(overrides)))]

    def _requeue_killed(self, trial, exc) -> None:
        """A job that ended without a result (the scheduler killed or preempted it, or it ran out of
        host memory) is treated as a killed worker's trial: FAILED, then re-queued (max_retries)."""
        import optuna

        frozen = self._frozen(trial.number)
        then = "re-queued as a new trial" if st.will_retry(frozen, int(self.s.max_retries)) \
            else f"not retried (max_retries={self.s.max_retries})"
        short = f"its job ended without a result (killed by the scheduler?); {then}"
        error = f"{short}: {job_error(exc)}"
        try:
            trial.set_user_attr(st.ERROR_ATTR, error[:2000])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker already failed it as stale
        self._tell(trial, optuna.trial.TrialState.FAIL)
        self.retry(self.study, self._frozen(trial.number))
        self.parent.mark_child(self.parent.find_child(trial.number), "killed",
                               trial_run_name(trial.number, trial.params, "killed"))
        print(outcome_line(trial.number, "failed", error=short))
        print(progress_line(self._counts(), self.n_trials, self.metric, st.best_trial(self.study),
                            self._pareto_size()), flush=True)

    def _conclude(self, trial, ret) -> None:
        """Tell the study how the job ended; tag its MLflow run; print the progress line."""
        import optuna
        from hydra.core.utils import JobStatus

        from phitune.sweep.trial_hook import PRUNED_AT_ATTR

        state, value, error = optuna.trial.TrialState.FAIL, None, None
        result = ret._return_value  # JobReturn.return_value re-raises a job's exception
        if ret.status == JobStatus.COMPLETED:
            values, error = objective_values(result, len(self.directions))
            if values is not None and PRUNED_AT_ATTR in self._frozen(trial.number).user_attrs:
                state = optuna.trial.TrialState.PRUNED  # report(..., raise_pruned=False) said stop; the job did
            elif values is not None:
                state = optuna.trial.TrialState.COMPLETE
                value = values[0] if len(values) == 1 else values
        elif _is_pruned(result):
            state = optuna.trial.TrialState.PRUNED
        else:
            error = job_error(result)
        child = self.parent.find_child(trial.number)
        attrs = {st.MLFLOW_RUN_ATTR: child.info.run_id} if child is not None else {}
        if error:
            attrs[st.ERROR_ATTR] = error[:2000]
        try:
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker already failed it as stale
        self._tell(trial, state, value)
        label = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned"}.get(state, "failed")
        if not self.phitune_app and value is not None:
            self.parent.log_objective(child, self._metric_names(), value if isinstance(value, list) else [value])
        frozen = self._frozen(trial.number)
        tokens = REPORT_TOKENS_ATTR in frozen.user_attrs  # train.py's reports count tokens, not steps
        self.parent.mark_child(child, label, trial_run_name(trial.number, trial.params, label, frozen.last_step,
                                                            tokens=tokens))
        self._mark_best()
        shown = frozen.value if label == "pruned" else value  # a pruned trial's value: its last report
        print(outcome_line(trial.number, label, shown, error, self.metric, frozen.last_step, tokens))
        counts = self._counts()
        print(progress_line(counts, self.n_trials, self.metric, st.best_trial(self.study), self._pareto_size()), flush=True)

    def _mark_best(self) -> None:
        """The best trial so far carries the mark in the runs table; the parent links to its run."""
        best = st.best_trial(self.study)  # None until one is complete, and for several objectives
        if best is not None:
            self.parent.mark_best(self.parent.find_child(best.number),
                                  trial_run_name(best.number, best.params, best=True))

    def _metric_names(self) -> list[str]:
        n = len(self.directions)
        return [self.metric] if n == 1 else [f"{self.metric}_{i}" for i in range(n)]

    def _pareto_size(self) -> int | None:
        return len(self.study.best_trials) if len(self.directions) > 1 else None

    def _tell(self, trial, state, value=None) -> None:
        try:
            self.study.tell(trial, state=state, values=value, skip_if_finished=True)
        except RuntimeError as exc:
            if "Study.stop" not in str(exc):  # the grid sampler asks to stop when the grid is done
                raise
        finally:
            self.in_flight.pop(trial.number, None)
            trial_id = self.trial_ids.pop(trial.number, None)
            if trial_id is not None:
                self.hb.remove(trial_id)

    def _check_failures(self) -> None:
        counts = self._counts()
        if counts.finished and counts.failed / counts.finished > float(self.s.max_failure_rate):
            raise SweepStopped(
                f"{counts.failed} of {counts.finished} finished trials failed, above "
                f"hydra.sweeper.max_failure_rate={self.s.max_failure_rate}; the last error: {self._last_error()} "
                f"(the errors are in the trials table and on each trial's MLflow run)")

    def _last_error(self) -> str:
        from optuna.trial import TrialState

        failed = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get(st.ERROR_ATTR)]
        return failed[-1].user_attrs[st.ERROR_ATTR] if failed else "unknown"

    # -- endings -----------------------------------------------------------------------
    def _interrupted(self) -> None:
        """Ctrl-C: FAIL the trials in flight and enqueue them again, so a re-run redoes them."""
        import optuna

        for number, trial in list(self.in_flight.items()):
            try:
                trial.set_user_attr(st.ERROR_ATTR, "interrupted (Ctrl-C or SIGTERM)")
                self._tell(trial, optuna.trial.TrialState.FAIL)
                self.retry(self.study, self._frozen(number))
                self.parent.mark_child(self.parent.find_child(number), "killed")
            except Exception as exc:  # the storage may be what hung; the heartbeat will time out instead
                print(f"  trial {number}: could not record the interruption ({exc})", file=sys.stderr)
        try:
            self.parent.finish("KILLED")
        except Exception:
            pass

    def _log_cost(self, step: int) -> None:
        """stop.price_per_gpu_hour set: what the study's trials cost, on the parent run."""
        if self.cost is None:
            return
        trials = self.study.get_trials(deepcopy=False)
        self.parent.log_metric("cost_total", cost.spent(trials, self.cost), step=step)
        self.parent.set_tag("phitune.cost", cost.describe(trials, self.cost))

    def _finish(self, stop_reason: str | None, status: str) -> None:
        from phitune.sweep.results import log_to_parent, write_results

        from optuna.trial import TrialState

        self.parent.close_orphans({t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))})
        counts = self._counts()
        path = write_results(self.study, self.sweep_dir, counts, self.n_trials, stop_reason)
        skipped = {}
        try:
            for attempt in range(3):
                try:
                    skipped = log_to_parent(self.parent, self.study, self.metric, counts, self.sweep_dir,
                                            bool(self.s.plots))
                    self._log_cost(counts.finished)
                    break
                except Exception as exc:
                    if attempt == 2 or not _write_collision(exc):
                        raise
                    time.sleep(0.5 + attempt)  # seconds; another worker is writing the same results
        finally:
            self.parent.set_tag(STUDY_TAG, self.study_name)
            if stop_reason:
                self.parent.set_tag("phitune.stop_reason", stop_reason[:5000])
            self.parent.finish(status)
        for name, why in skipped.items():
            print(f"  plot {name} skipped: {why}")
        best = st.best_trial(self.study)
        if best is not None:
            params = " ".join(sp.override(k, v) for k, v in best.params.items())
            print(f"sweep {self.study_name}: best {self.metric} {best.value:.4g} (trial {best.number}): {params}")
        elif len(self.directions) > 1:
            front = sorted(t.number for t in self.study.best_trials)
            print(f"sweep {self.study_name}: {len(front)} Pareto solution(s), trials {', '.join(map(str, front)) or '-'}")
        print(f"  results: {path} · MLflow parent run {self.parent.run_id}")
        print(f"  see it:  mlflow ui --backend-store-uri {redact.redact_text(str(self.tracking.uri))}  ->  "
              f"{ui_url(self.parent.experiment_id)}")


def stop_target(settings, directions: list[str]) -> float | None:
    """hydra.sweeper.stop.target as a number, for a sweep of one objective."""
    target = OmegaConf.select(settings, "stop.target", default=None)
    if target is None:
        return None
    if len(directions) > 1:
        raise PhituneError(f"hydra.sweeper.stop.target={target}: a sweep of {len(directions)} objectives has no single "
                           "best value to compare; remove stop.target")
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise PhituneError(f"hydra.sweeper.stop.target={target!r}: expected a number") from None
    if not math.isfinite(value):
        raise PhituneError(f"hydra.sweeper.stop.target={target}: expected a finite number")
    return value


# An override holding a secret reaches the jobs through this environment variable (N = its
# position), set in the sweeper's process and inherited by every job.
SECRET_ENV = "PHITUNE_TRIAL_SECRET_{}"
HYDRA_SECRET_ENV = "PHITUNE_HYDRA_SECRET_{}"


def hide_secret_overrides(fixed: list[str], env_name: str = SECRET_ENV, hydra_keys: bool = False) -> list[str]:
    """`tracking.uri=postgresql://u:pw@host/db` -> `tracking.uri=${oc.env:PHITUNE_TRIAL_SECRET_0}`.

    Hydra prints each job's overrides (`#0 : ...`) and writes them to its .hydra/overrides.yaml;
    the job's config resolves the variable when it reads the value, and what phitune logs of
    it (params, config.yaml) is masked there."""
    import os

    out = []
    for i, ov in enumerate(fixed):
        head, sep, value = ov.partition("=")
        if sep and value and redact.redact_overrides([ov]) != [ov] and head.lstrip("+~").startswith("hydra.") == hydra_keys:
            name = env_name.format(i)
            quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
            os.environ[name] = value[1:-1] if quoted else value
            ov = f"{head}=${{oc.env:{name}}}"
        out.append(ov)
    return out


def _hide_secret_hydra_overrides(config) -> None:
    """The sweep's own hydra overrides (`hydra.sweeper.storage=postgresql://u:pw@...`) are
    replayed into every job and written to its .hydra/hydra.yaml: there they read the
    value from this process's environment. The sweeper itself already holds the values."""
    from omegaconf import open_dict, read_write

    listed = OmegaConf.select(config, "hydra.overrides.hydra", default=None)
    if not listed:
        return
    hidden = hide_secret_overrides(list(listed), HYDRA_SECRET_ENV, hydra_keys=True)
    if hidden != list(listed):
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra = hidden


def _write_collision(exc: Exception) -> bool:
    """Two workers wrote the same new tag or param of the parent run at once (MLflow's set_tag
    is an INSERT on PostgreSQL): the retry updates the row the other worker wrote."""
    text = str(exc)
    return any(s in text for s in ("UniqueViolation", "duplicate key", "UNIQUE constraint", "IntegrityError"))


def batch_size(n_jobs, launcher_n_jobs) -> int:
    """hydra.sweeper.n_jobs, else the launcher's (joblib: -1 = all cores), else 1."""
    import os

    if n_jobs is None:
        n_jobs = launcher_n_jobs if launcher_n_jobs is not None else 1
        if int(n_jobs) < 0:  # joblib's convention: -1 = every core, -2 = all but one...
            n_jobs = max(1, (os.cpu_count() or 1) + 1 + int(n_jobs))
    if int(n_jobs) < 1:
        raise PhituneError(f"hydra.sweeper.n_jobs={n_jobs}: expected 1 or more")
    return int(n_jobs)


def job_error(exc) -> str:
    """The one line a failed trial records; running out of memory names the settings that reduce it."""
    from phitune.train.memory import failure_line

    return "the job did not run" if exc is None else failure_line(exc)


# Launchers that hand jobs to a scheduler (hydra/launcher=submitit_slurm, submitit_local).
SCHEDULER_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.",)


def is_scheduler_launcher(target: str | None) -> bool:
    return bool(target) and str(target).startswith(SCHEDULER_LAUNCHERS)


def job_died(exc) -> bool:
    """submitit's UncompletedJobError: the job's process ended without writing its result
    (SIGKILL, scancel, preemption, a time limit). An exception of the app itself comes back
    inside a JobReturn instead (Hydra's run_job catches it)."""
    return type(exc).__name__ == "UncompletedJobError"


def _is_pruned(exc) -> bool:
    import optuna

    # A joblib worker pickles the exception back: same class, but be lenient about its module.
    return isinstance(exc, optuna.TrialPruned) or type(exc).__name__ == "TrialPruned"


def _failed_return(exc):
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn()
    ret.status = JobStatus.FAILED
    ret.return_value = exc
    return ret
