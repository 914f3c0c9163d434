"""The Optuna side of a sweep: storage, samplers, pruners, and what counts toward n_trials.

The study is the single source of truth shared by every worker and every job:
- user attr `phitune.pruner` holds the pruner spec, so a job (another process,
  maybe another machine) rebuilds the same pruner for `Trial.should_prune()`;
- user attr `phitune.parent_run_id` holds the MLflow parent run, so a resumed sweep
  logs its children under the same parent;
- a trial killed mid-run is FAILED, with the reason in its user attr `error`, and
  re-enqueued (WAITING, same params) with the system attrs `failed_trial` /
  `retry_history` that Optuna's RetryHeartbeatStaleTrialCallback uses, so Optuna's
  helpers read them too;
- a trial asked after the study was already full (two workers racing for the last
  slot) is FAILED with user attr `phitune.discarded` and never run.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from phitune import redact
from phitune.errors import PhituneError

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

PRUNER_ATTR = "phitune.pruner"
PARENT_RUN_ATTR = "phitune.parent_run_id"
SPACE_ATTR = "phitune.search_space"
N_TRIALS_ATTR = "phitune.n_trials"
DISCARDED_ATTR = "phitune.discarded"
ERROR_ATTR = "error"
TOKENS_ATTR = "train_tokens"
MLFLOW_RUN_ATTR = "mlflow_run_id"

# sqlite: wait this long (seconds) for another process's write lock instead of failing
# with "database is locked": workers, jobs and heartbeats all write to one file.
SQLITE_LOCK_TIMEOUT_S = 60


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO and flags heartbeat APIs as experimental: the sweep prints its own lines."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # The sweeper drives heartbeats itself (ask/tell), which Optuna only expects from optimize().
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


# -- storage ---------------------------------------------------------------------------------

def absolute_storage_url(url: str, base_dir: str | None = None) -> str:
    """`sqlite:///mlruns/optuna.db` -> `sqlite:////abs/mlruns/optuna.db` (its folder created);
    `journal://study.log` -> `journal:///abs/study.log`.

    Jobs may run in another working directory (hydra.job.chdir, joblib workers), so
    they get an absolute path. Other URLs are returned unchanged.
    """
    if url.startswith(JOURNAL_PREFIX):
        path = os.path.abspath(os.path.join(base_dir or os.getcwd(), url[len(JOURNAL_PREFIX):]))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return JOURNAL_PREFIX + path
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url.startswith(prefix + "/") or url == prefix + ":memory:":
        if url.startswith(prefix + "/"):
            os.makedirs(os.path.dirname(url[len(prefix):]), exist_ok=True)
        return url
    path = os.path.abspath(os.path.join(base_dir or os.getcwd(), url[len(prefix):]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return prefix + path


# Optuna's JournalStorage on a file: `journal:///shared/disk/study.log` (`journal://` + a path,
# absolute or relative to the sweep's folder), for workers that share a disk but no database.
# Appends under a lock file beside it (Optuna's JournalFileSymlinkLock), no server.
JOURNAL_PREFIX = "journal://"


def has_heartbeats(storage) -> bool:
    """RDB storages record heartbeats; Optuna's JournalStorage has none (a dead worker's trial stays RUNNING)."""
    return hasattr(storage, "record_heartbeat")


# A storage URL with a password reaches the jobs through this environment variable,
# never as an override: overrides are logged by Hydra and end up in MLflow params.
STORAGE_ENV = "PHITUNE_TRIAL_STORAGE_URL"
ENV_PREFIX = "env:"


def job_storage_ref(url: str) -> str:
    """What the sweeper passes as trial.storage: the URL itself, or `env:NAME` when it
    carries a password (the URL is then put in NAME for this process and its children)."""
    try:
        from sqlalchemy.engine import make_url

        has_password = make_url(url).password is not None
    except Exception:
        has_password = False
    if not has_password:
        return url
    os.environ[STORAGE_ENV] = url
    return ENV_PREFIX + STORAGE_ENV


def resolve_storage_ref(ref: str) -> str:
    if not ref.startswith(ENV_PREFIX):
        return ref
    name = ref[len(ENV_PREFIX):]
    if not os.environ.get(name):
        raise PhituneError(f"trial.storage={ref}: the environment variable {name} is not set in this job "
                           "(the sweeper sets it for the jobs it launches)")
    return os.environ[name]


def display_url(url: str) -> str:
    """The URL without its password, for logs and MLflow params."""
    return redact.redact_text(url)


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 stale_callback: Callable | None = None):
    """An RDBStorage (with heartbeats when an interval is given); retried while another
    process is creating the same database's tables. `journal://PATH`: a JournalStorage."""
    import optuna
    import sqlalchemy.exc

    quiet_optuna()
    if url.startswith(JOURNAL_PREFIX):
        return _journal_storage(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_LOCK_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True  # a long sweep outlives idle server connections
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs}
    if heartbeat_interval:
        kwargs.update(heartbeat_interval=int(heartbeat_interval), grace_period=int(grace_period or 2 * heartbeat_interval),
                      heartbeat_stale_trial_callback=stale_callback)
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Another worker is creating the schema: PostgreSQL says DuplicateTable (a ProgrammingError)
            # when both passed create_all's existence check before either committed.
            racing = not isinstance(exc, sqlalchemy.exc.ProgrammingError) or "already exists" in str(exc)
            if attempt == 4 or not racing:
                raise
            time.sleep(0.5 + attempt)  # seconds
        except sqlalchemy.exc.ArgumentError as exc:
            raise PhituneError(f"hydra.sweeper.storage: not a database URL: {display_url(url)} ({exc})") from None
        except ImportError as exc:
            raise PhituneError(f"hydra.sweeper.storage {display_url(url)} needs a database driver: {exc}") from None
    raise AssertionError("unreachable")


def _journal_storage(url: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = url[len(JOURNAL_PREFIX):]
    if not path or os.path.isdir(path):
        raise PhituneError(f"hydra.sweeper.storage={url}: expected journal:///path/to/study.log, a file "
                           "(on a disk every worker shares)")
    try:
        return JournalStorage(JournalFileBackend(path))
    except OSError as exc:
        raise PhituneError(f"hydra.sweeper.storage={url}: cannot open the journal file ({exc.strerror or exc})") from None
    except optuna.exceptions.StorageInternalError as exc:
        raise PhituneError(f"hydra.sweeper.storage={url}: not an Optuna journal ({exc})") from None


# -- samplers and pruners --------------------------------------------------------------------

# Sampler names (phitune's `sampler.name`, the `hydra/sweeper/sampler` options) -> Optuna classes.
SAMPLER_CLASSES = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "cmaes": "CmaEsSampler",
                   "qmc": "QMCSampler", "nsgaii": "NSGAIISampler", "nsgaiii": "NSGAIIISampler", "gp": "GPSampler"}
SAMPLERS = tuple(SAMPLER_CLASSES)
# What `sampler.name: X` passes when the node is another sampler's (phitune's sweeps/*.yaml name
# their sampler on the default TPE node): these arguments, the node's value where it has one.
_NAMED_ARGS = {"tpe": {"seed": None, "n_startup_trials": 10, "multivariate": False, "constant_liar": False},
               "cmaes": {"seed": None, "n_startup_trials": 10},
               "qmc": {"seed": None, "scramble": True}}
_NEEDS = {"cmaes": ("cmaes", "pip install cmaes"), "qmc": ("scipy", "pip install scipy"),
          "gp": ("scipy", "pip install scipy")}
_OWN_KEYS = ("_target_", "name", "_partial_")


@dataclass(frozen=True)
class SamplerChoice:
    name: str  # tpe, random, ... or the class name of another optuna.samplers.X
    cls: str  # optuna.samplers.X
    kwargs: dict  # its arguments, seed included


def sampler_choice(conf) -> SamplerChoice:
    """hydra.sweeper.sampler -> which Optuna sampler, with which arguments.

    `_target_` (the `hydra/sweeper/sampler` option, tpe by default) and phitune's `name` both
    pick one. `name` over the default TPE node picks another sampler (sweeps/*.yaml do that);
    a `name` that contradicts a node chosen otherwise is refused rather than guessed.
    """
    target = _get(conf, "_target_")
    target_name = _sampler_name(str(target)) if target else None
    name = str(_get(conf, "name") or "").strip().lower() or None
    if name is not None and name not in SAMPLER_CLASSES:
        raise PhituneError(f"hydra.sweeper.sampler.name={name!r}: expected one of {', '.join(SAMPLERS)}")
    if name is not None and target_name not in (None, name, "tpe"):
        raise PhituneError(f"hydra.sweeper.sampler: name={name} and _target_={target} are two different samplers; "
                           f"keep one (hydra/sweeper/sampler={name}, or hydra.sweeper.sampler.name={target_name})")
    chosen = name or target_name or "tpe"
    cls = f"optuna.samplers.{SAMPLER_CLASSES[chosen]}" if chosen in SAMPLER_CLASSES else str(target)
    values = {k: v for k, v in _plain(conf).items() if k not in _OWN_KEYS}
    if chosen == target_name or target_name is None and name is None:
        kwargs = values  # the node is this sampler's own: all of its arguments
    else:
        kwargs = {k: values.get(k, default) for k, default in _NAMED_ARGS.get(chosen, {"seed": None}).items()}
    # A node retargeted by hand (_target_=...RandomSampler on the TPE node) keeps TPE's fields: drop them.
    accepted = _arguments(cls)
    return SamplerChoice(chosen, cls, {k: v for k, v in kwargs.items() if k in accepted})


def _arguments(cls_path: str) -> set[str]:
    import inspect

    from hydra.utils import get_class

    try:
        cls = get_class(cls_path)
    except Exception:
        raise PhituneError(f"hydra.sweeper.sampler._target_={cls_path}: no such sampler in this Optuna") from None
    return set(inspect.signature(cls).parameters)


def _sampler_name(target: str) -> str:
    if not target.startswith("optuna.samplers."):
        raise PhituneError(f"hydra.sweeper.sampler._target_={target}: expected one of Optuna's samplers "
                           "(optuna.samplers.TPESampler, optuna.samplers.RandomSampler, ...)")
    cls = target.rsplit(".", 1)[-1]
    return next((k for k, v in SAMPLER_CLASSES.items() if v == cls), cls)


def _get(conf, key: str):
    return conf.get(key) if hasattr(conf, "get") else getattr(conf, key, None)


def _plain(conf) -> dict:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(conf):
        return OmegaConf.to_container(conf, resolve=True)
    return dict(conf)


def make_sampler(conf, space: dict[str, "BaseDistribution"], trial_number: int | None = None):
    """The sampler for one trial. tpe/random are stateless besides their RNG, so trial N
    gets seed + N: a resumed or second worker does not replay earlier random draws."""
    from hydra.utils import get_class

    quiet_optuna()  # QMC, GP and others are flagged experimental
    choice = sampler_choice(conf)
    module, hint = _NEEDS.get(choice.name, (None, None))
    if module is not None:
        try:
            __import__(module)
        except ImportError:
            raise PhituneError(f"sampler {choice.name} needs the `{module}` package: {hint}") from None
    cls = get_class(choice.cls)
    kwargs = {k: _built(v) for k, v in choice.kwargs.items()}
    seed = kwargs.get("seed")
    if seed is not None and trial_number is not None and choice.name in ("tpe", "random"):
        kwargs["seed"] = int(seed) + int(trial_number)
    if "search_space" in _arguments(choice.cls):  # the grid: every value of each parameter
        from phitune.sweep.space import grid_values

        kwargs["search_space"] = {k: grid_values(k, d) for k, d in space.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"hydra.sweeper.sampler ({choice.cls}): {exc}") from None


def _built(value):
    """An argument given as a `_target_` node (gamma, mutation, independent_sampler...) -> the object."""
    from hydra.utils import instantiate

    if isinstance(value, dict) and "_target_" in value:
        return instantiate(value)
    return value


def grid_size(space: dict[str, "BaseDistribution"]) -> int:
    from phitune.sweep.space import grid_values

    return math.prod(len(grid_values(k, d)) for k, d in space.items())


def pruner_spec(conf) -> dict:
    """The pruner settings as plain JSON, stored on the study for jobs to rebuild (phitune.sweep.pruning)."""
    from phitune.sweep.pruning import pruner_spec as spec

    return spec(conf)


def build_pruner(spec: dict | None):
    """pruner_spec(...) -> a pruner; a study without a spec (not created by phitune) is not pruned."""
    from phitune.sweep.pruning import build_pruner as build

    return build(spec)


def describe_sampler(conf) -> str:
    """`tpe(seed=42, n_startup_trials=5)`: the sampler and the arguments that matter most."""
    choice = sampler_choice(conf)
    seed = choice.kwargs.get("seed")
    extra = f"seed={seed}" if seed is not None else "seed=none"
    if "n_startup_trials" in choice.kwargs:
        extra += f", n_startup_trials={choice.kwargs['n_startup_trials']}"
    return f"{choice.name}({extra})"


def describe_pruner(spec: dict) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({rest})"


# -- trials: retries, counts -----------------------------------------------------------------

def _retry_history(trial) -> list[int]:
    return list(trial.system_attrs.get("retry_history", [])) + [trial.number]


def will_retry(trial, max_retries: int) -> bool:
    return len(_retry_history(trial)) <= max_retries


def retry_callback(max_retries: int) -> Callable:
    """Called with each trial that was FAILED as stale or interrupted: enqueue the same
    params again (WAITING) unless it was already retried max_retries times."""

    def retry(study: "optuna.Study", trial) -> None:
        import optuna

        history = _retry_history(trial)
        if not will_retry(trial, max_retries):
            return
        # Copied as a whole: the grid sampler finds its `grid_id` again.
        system_attrs = dict(trial.system_attrs, failed_trial=history[0], retry_history=history)
        user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (TOKENS_ATTR, ERROR_ATTR, MLFLOW_RUN_ATTR)}
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs=user_attrs, system_attrs=system_attrs))

    return retry


def fail_stale_trials(study, max_retries: int) -> list[int]:
    """Optuna's fail_stale_trials, with the reason in each failed trial's `error` user attr
    (the trials table, `optimization_results.yaml` and Optuna's dashboard show it); returns
    the numbers of the trials this call failed. Then the storage's callback re-enqueues them."""
    import optuna

    storage = study._storage
    rdb = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        return []
    grace_s = getattr(rdb, "grace_period", None) or 2 * interval  # Optuna's default grace
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        trial = storage.get_trial(trial_id)
        then = "re-queued as a new trial" if will_retry(trial, max_retries) else f"not retried (max_retries={max_retries})"
        try:
            # Set while the trial is still RUNNING (a finished trial's attrs are frozen). Should its
            # worker finish it in the instant between these two calls, it keeps a stale note.
            storage.set_trial_user_attr(trial_id, ERROR_ATTR, f"no heartbeat for {grace_s} s (its worker died); {then}")
            if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first
    callback = storage.get_heartbeat_stale_trial_callback()
    numbers = []
    for trial_id in failed:
        trial = storage.get_trial(trial_id)
        numbers.append(trial.number)
        if callback is not None:
            callback(study, trial)
    return numbers


@dataclass
class Counts:
    """The study's trials as the sweep counts them (retried and discarded trials left out)."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    tokens: int = 0  # training tokens over every trial, including retried and running ones

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def allocated(self) -> int:
        return self.finished + self.running + self.waiting


def superseded_numbers(trials) -> set[int]:
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def counted(trials) -> list:
    """Trials that take a slot of n_trials: not discarded, not replaced by a retry."""
    gone = superseded_numbers(trials)
    return [t for t in trials if t.number not in gone and not t.user_attrs.get(DISCARDED_ATTR)]


def count_trials(trials) -> Counts:
    from optuna.trial import TrialState

    c = Counts()
    for t in counted(trials):
        if t.state == TrialState.COMPLETE:
            c.complete += 1
        elif t.state == TrialState.PRUNED:
            c.pruned += 1
        elif t.state == TrialState.FAIL:
            c.failed += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
    c.tokens = sum(int(t.user_attrs.get(TOKENS_ATTR) or 0) for t in trials)
    return c


def slot_of(trials, number: int) -> int:
    """0-based position of trial `number` among the counted trials (by trial number)."""
    return sum(1 for t in counted(trials) if t.number < number)


def best_trial(study):
    """The best COMPLETE trial, or None (also for several objectives: see results.pareto_front)."""
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:
        return None
