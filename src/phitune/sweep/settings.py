"""The sweeper's settings, `hydra.sweeper.*` (structured: a typo fails at composition).

Names follow the Hydra Optuna sweeper where it has one (n_trials, sampler, direction,
storage, study_name, n_jobs, max_failure_rate, params); the rest is phitune's.
Only dataclasses here: Hydra imports the plugin (and so this module) at every start.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

SWEEPER_TARGET = "hydra_plugins.phitune_optuna_sweeper.phitune_optuna_sweeper.PhituneOptunaSweeper"


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid | cmaes | qmc
    # tpe and random: trial N samples with seed + N, so a resumed or parallel sweep does
    # not replay the first trials' random draws. null = not reproducible.
    seed: Optional[int] = 42
    n_startup_trials: int = 10  # tpe, cmaes: random trials before the model is used
    multivariate: bool = False  # tpe: model parameters jointly
    constant_liar: bool = False  # tpe: parallel workers avoid points near running trials


@dataclass
class PrunerConf:
    name: str = "median"  # median | successive_halving | hyperband | threshold | none
    # median: no pruning until this many trials completed, nor before step n_warmup_steps
    # (optimizer steps, as the job reports them; a report at exactly that step can prune).
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    # successive_halving / hyperband: resources are the job's report steps.
    min_resource: Any = "auto"
    max_resource: Any = "auto"  # hyperband
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0  # successive_halving
    # threshold: prune as soon as a report leaves [lower, upper] (e.g. a diverging loss).
    lower: Optional[float] = None
    upper: Optional[float] = None


@dataclass
class PhituneOptunaSweeperConf:
    _target_: str = SWEEPER_TARGET
    n_trials: int = 20  # the whole study, over every invocation and worker
    direction: str = "minimize"  # minimize | maximize
    metric: str = "full_valid_loss"  # what the job returns; names it in progress lines and MLflow
    # Jobs reach their trial through this database, so it must be one every job can open:
    # sqlite for one machine, PostgreSQL/MySQL for several. Relative sqlite paths are
    # resolved against the directory the sweep is started from.
    storage: str = "sqlite:///mlruns/optuna.db"
    study_name: Optional[str] = None  # null = <tracking.experiment>-<sweep name>
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    # Trials launched per batch. null = the launcher's n_jobs (hydra/launcher=joblib
    # hydra.launcher.n_jobs=2 runs 2 trials at a time), or 1 for Hydra's basic launcher.
    n_jobs: Optional[int] = None
    max_failure_rate: float = 0.5  # stop when failed / finished trials exceeds this
    max_retries: int = 2  # a trial killed mid-run (stale heartbeat, Ctrl-C) is re-run this often
    max_total_tokens: Optional[int] = None  # training tokens over all trials; then no new trial
    timeout: Optional[float] = None  # seconds of this invocation; then no new trial
    # A worker records a heartbeat for its running trials every heartbeat_interval seconds;
    # a RUNNING trial without one for grace_period seconds belongs to a dead process.
    heartbeat_interval: int = 10
    grace_period: int = 60
    plots: bool = True  # Optuna plots (PNG) on the parent run at the end
    # name -> search space (interval(), int(interval()), tag(log, ...), choice(), range())
    # or a plain value that every trial gets.
    params: Dict[str, str] = field(default_factory=dict)
