"""The sweeper's settings, `hydra.sweeper.*` (structured: a typo fails at composition).

Names follow the Hydra Optuna sweeper where it has one (n_trials, sampler, direction,
storage, study_name, n_jobs, max_failure_rate, params, custom_search_space), so an app
written for it runs with `override hydra/sweeper: phitune_optuna`; the rest is phitune's.

The sampler is picked either way, and both spellings compose:

    hydra/sweeper/sampler=random  hydra.sweeper.sampler.seed=1     the Hydra Optuna sweeper's group
    hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler    (each node is optuna.samplers.X + its arguments)
    hydra.sweeper.sampler.name=random                               phitune's spelling (sweeps/*.yaml)

Only dataclasses here: Hydra imports the plugin (and so this module) at every start.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SWEEPER_TARGET = "hydra_plugins.phitune_optuna_sweeper.phitune_optuna_sweeper.PhituneOptunaSweeper"
# tpe and random: trial N samples with seed + N, so a resumed or parallel sweep does not
# replay the first trials' random draws. null = not reproducible.
DEFAULT_SEED = 42
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"


@dataclass
class SamplerConf:
    """What every sampler node has. `name` (phitune's spelling) picks the sampler by name;
    null = the node's `_target_` (the `hydra/sweeper/sampler` option, TPE by default)."""

    _target_: Optional[str] = None
    name: Optional[str] = None  # tpe | random | grid | cmaes | qmc | nsgaii | nsgaiii | gp
    seed: Optional[int] = DEFAULT_SEED


# One node per option of the `hydra/sweeper/sampler` group: Optuna's arguments, Optuna's
# defaults unless a comment says why not. Arguments that take objects (gamma, mutation,
# independent_sampler...) accept a `_target_` node, which is instantiated.

@dataclass
class TPESamplerConf(SamplerConf):
    _target_: Optional[str] = "optuna.samplers.TPESampler"
    n_startup_trials: int = 10  # random trials before the model is used
    n_ei_candidates: int = 24
    multivariate: bool = False  # model parameters jointly
    group: bool = False
    # Optuna 4+ defaults to True; the sweeper asks a batch at once, and phitune's sweeps were
    # tuned without it.
    constant_liar: bool = False
    consider_prior: Optional[bool] = None
    prior_weight: Optional[float] = None
    consider_magic_clip: Optional[bool] = None
    consider_endpoints: Optional[bool] = None
    warn_independent_sampling: Optional[bool] = None
    gamma: Optional[Any] = None
    weights: Optional[Any] = None
    constraints_func: Optional[Any] = None


@dataclass
class RandomSamplerConf(SamplerConf):
    _target_: Optional[str] = "optuna.samplers.RandomSampler"


@dataclass
class GridSamplerConf(SamplerConf):
    # The grid itself is hydra.sweeper.params (choice() and range() values), built at run time.
    _target_: Optional[str] = "optuna.samplers.GridSampler"


@dataclass
class CmaEsSamplerConf(SamplerConf):
    _target_: Optional[str] = "optuna.samplers.CmaEsSampler"
    x0: Optional[Dict[str, Any]] = None
    sigma0: Optional[float] = None
    n_startup_trials: int = 1
    independent_sampler: Optional[Any] = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: Optional[str] = None
    popsize: Optional[int] = None
    inc_popsize: int = -1
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False


@dataclass
class QMCSamplerConf(SamplerConf):
    _target_: Optional[str] = "optuna.samplers.QMCSampler"
    qmc_type: str = "sobol"
    scramble: bool = True  # Optuna's default is False, where the seed changes nothing
    independent_sampler: Optional[Any] = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class NSGAIISamplerConf(SamplerConf):
    _target_: Optional[str] = "optuna.samplers.NSGAIISampler"
    population_size: int = 50
    mutation_prob: Optional[float] = None
    crossover: Optional[Any] = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5
    constraints_func: Optional[Any] = None


@dataclass
class NSGAIIISamplerConf(NSGAIISamplerConf):
    _target_: Optional[str] = "optuna.samplers.NSGAIIISampler"
    dividing_parameter: int = 3
    reference_points: Optional[Any] = None


@dataclass
class GPSamplerConf(SamplerConf):
    _target_: Optional[str] = "optuna.samplers.GPSampler"
    independent_sampler: Optional[Any] = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False
    constraints_func: Optional[Any] = None
    warn_independent_sampling: bool = True


# The `hydra/sweeper/sampler` group: option name -> node.
SAMPLER_GROUP = {"tpe": TPESamplerConf, "random": RandomSamplerConf, "grid": GridSamplerConf,
                 "cmaes": CmaEsSamplerConf, "qmc": QMCSamplerConf, "nsgaii": NSGAIISamplerConf,
                 "nsgaiii": NSGAIIISamplerConf, "gp": GPSamplerConf}


@dataclass
class PrunerConf:
    """How trials are stopped early (phitune.sweep.pruning). phitune's train.py reports the loss
    on a fixed validation subset against the training tokens seen (phitune.sweep.axis), so
    `steps` below are tokens there; any other app's steps are what it passes to report()."""

    name: str = "median"  # median | percentile | successive_halving | hyperband | wilcoxon | threshold | none
    # train.py: a report every this fraction of an epoch (one pass over the training data: the
    # same tokens for every trial of a sweep), on the first report_examples validation examples.
    report_every: float = 0.1
    report_examples: int = 16
    # median, percentile, wilcoxon, threshold: no pruning before a trial has trained this
    # fraction of its own planned tokens (0.1: a 3-epoch trial from 0.3 epochs, a 1-epoch from 0.1).
    warmup: float = 0.0
    # every pruner: a trial that has trained this fraction of its own planned tokens is never
    # pruned (0.7: a 3-epoch trial finishes from 2.1 epochs); 1.0 = judged up to its last report.
    finish_from: float = 1.0
    # successive_halving, median, percentile: compare a trial only with trials of the same
    # planned length (at equal tokens a shorter trial's learning rate has decayed further).
    same_length: bool = False
    # median / percentile: no pruning until this many trials completed, nor before step
    # n_warmup_steps (steps as reported); a trial is compared with the completed trials that
    # reported at the same step, at least n_min_trials of them.
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1
    percentile: float = 25.0  # percentile: prune a trial worse than this percentile (median = 50)
    # successive_halving / hyperband: resources in reported steps. min_resource auto = the first
    # report point for train.py; max_resource (hyperband) auto = the longest planned trial so far.
    min_resource: Any = "auto"
    max_resource: Any = "auto"
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0  # successive_halving
    bootstrap_count: int = 0
    # wilcoxon: for reports that are problem instances (one value per evaluation example), not a curve.
    p_threshold: float = 0.1
    n_startup_steps: int = 2
    # threshold: prune as soon as a report leaves [lower, upper] (e.g. a diverging loss).
    lower: Optional[float] = None
    upper: Optional[float] = None


@dataclass
class StopConf:
    """When a sweep stops starting trials before n_trials, checked before each trial."""

    # Stop once the best complete trial's objective reaches this value (<= when minimizing,
    # >= when maximizing), e.g. `hydra.sweeper.stop.target=1.5` for a good-enough loss.
    target: Optional[float] = None
    # Local sweeps: stop once the cost so far plus the next trial's estimate (the mean cost of
    # the complete and pruned trials) would pass max_cost. A trial costs its wall hours x 1 GPU
    # x price_per_gpu_hour (phitune.sweep.cost); a price alone records the cost on the parent
    # run. backend=azureml has backend.max_cost and backend.price_per_node_hour instead.
    max_cost: Optional[float] = None  # in `currency`, over the whole study
    price_per_gpu_hour: Optional[float] = None  # one GPU (or the CPU) for one hour, in `currency`
    currency: str = "USD"  # a label for the amounts printed and logged


@dataclass
class SweepTrackingConf:
    """The MLflow store of an app that has no `tracking` node of its own (phitune's train.py
    has one, and its sweep uses that). null = $MLFLOW_TRACKING_URI, else phitune's default
    sqlite:///mlruns/mlflow.db; experiment null = $MLFLOW_EXPERIMENT_NAME, else the app's name."""

    uri: Optional[str] = None
    experiment: Optional[str] = None


@dataclass
class PhituneOptunaSweeperConf:
    _target_: str = SWEEPER_TARGET
    # Hydra hands the sampler's node to the sweeper as settings, not as an instantiated sampler:
    # the sweeper builds one per trial (seed + N) and the grid from the search space.
    _recursive_: bool = False
    # `_self_` first: the group option (a subclass of SamplerConf) is merged onto the base node.
    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}])
    n_trials: int = 20  # the whole study, over every invocation and worker
    # minimize | maximize, or a list of them for several objectives (the job returns a sequence).
    direction: Any = "minimize"
    # What the job returns: names it in progress lines and MLflow. null = full_valid_loss for
    # phitune's train.py (an app with phitune's `trial` node), `objective` for any other app.
    metric: Optional[str] = None
    # Jobs reach their trial through this database, so it must be one every job can open:
    # sqlite for one machine, PostgreSQL/MySQL for several. Relative sqlite paths are
    # resolved against the directory the sweep is started from. null (the Hydra Optuna
    # sweeper's in-memory study) = this default file, so that a re-run resumes.
    storage: Optional[str] = DEFAULT_STORAGE
    # null = <tracking.experiment>-<sweep name> for phitune's train.py, the app's name otherwise
    study_name: Optional[str] = None
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    # Trials launched per batch. null = the launcher's n_jobs (hydra/launcher=joblib
    # hydra.launcher.n_jobs=2 runs 2 trials at a time), or 1 for Hydra's basic launcher.
    n_jobs: Optional[int] = None
    # Stop when failed / finished trials (over the whole study) exceeds this; 0 = at the first failure.
    max_failure_rate: float = 0.5
    max_retries: int = 2  # a trial killed mid-run (stale heartbeat, Ctrl-C) is re-run this often
    max_total_tokens: Optional[int] = None  # training tokens over all trials; then no new trial
    timeout: Optional[float] = None  # seconds of this invocation; then no new trial
    stop: StopConf = field(default_factory=StopConf)
    # A worker records a heartbeat for its running trials every heartbeat_interval seconds;
    # a RUNNING trial without one for grace_period seconds belongs to a dead process.
    heartbeat_interval: int = 10
    grace_period: int = 60
    plots: bool = True  # Optuna plots (PNG) on the parent run at the end
    # name -> search space (interval(), int(interval()), tag(log, ...), choice(), range())
    # or a plain value that every trial gets.
    params: Optional[Dict[str, str]] = field(default_factory=dict)
    # A dotpath to `configure(cfg, trial)`, called after params are sampled: it may suggest
    # more parameters (trial.suggest_float("z", ...)), each passed to the job as `name=value`.
    custom_search_space: Optional[str] = None
    tracking: SweepTrackingConf = field(default_factory=SweepTrackingConf)
