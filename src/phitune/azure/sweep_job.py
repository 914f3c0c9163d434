"""`python train.py -m backend=azureml`: the Optuna sweep as one Azure ML sweep job.

phitune's Optuna sweeper hands over its search space (Hydra-Optuna grammar,
keyed by config path) and its settings; this module translates them, refuses
what Azure ML would refuse, and builds a SweepJob whose trials run

    python train.py <overrides> backend=local <path>=${{search_space.<name>}} ...

Each trial is an Azure ML command job with its own MLflow run (see
phitune.tracking.context); Azure reads the primary metric `full_valid_loss` from it.

Search space (Hydra-Optuna grammar -> azure.ai.ml.sweep):

| Hydra override                   | Azure ML                     | note                                     |
|----------------------------------|------------------------------|------------------------------------------|
| interval(a, b)                   | Uniform(a, b)                |                                          |
| tag(log, interval(a, b))         | LogUniform(ln a, ln b)       | Azure takes the bounds in natural log    |
| int(interval(a, b))              | QUniform(a, b, q=1)          | bound as `int(${{search_space.x}})`      |
| tag(log, int(interval(a, b)))    | QLogUniform(ln a, ln b, q=1) | bound as `int(...)`; random sampling only|
| choice(x, y, ...)                | Choice([x, y, ...])          |                                          |
| range(a, b[, step])              | Choice(list(range))          | stop excluded, as in Hydra               |
| a plain value                    | fixed override on every trial|                                          |

int(interval) maps to QUniform rather than Randint: Azure's Randint(upper)
draws from [0, upper) and cannot start at a; QUniform(a, b, 1) rounds a uniform
draw to an integer in [a, b] (the two ends half as likely), and Bayesian
sampling accepts it. Azure passes it as a number that may read "3.0", hence the
Hydra `int()` cast in the trial's command.

Sampler (hydra.sweeper.sampler) -> sampling_algorithm. Where Azure ML has no equivalent,
the nearest one that keeps the search space and the pruner is used, one `note:` line says
what was translated and why, and the sweep job's tag `phitune.translation` records it:

| Optuna            | Azure ML                               | why                                                          |
|-------------------|----------------------------------------|--------------------------------------------------------------|
| tpe, gp, cmaes    | bayesian, when the space is choice/uniform/quniform and there is no pruner | Azure's one model-based sampler |
| tpe, gp, cmaes    | random (seed kept), otherwise          | bayesian takes no log scale and no early termination         |
| random            | random (seed kept)                     | every distribution; any early termination                    |
| qmc (sobol)       | random, rule=sobol                     | as random                                                    |
| qmc (halton)      | random, rule=sobol                     | Azure's only quasi-random sequence                           |
| grid, bruteforce  | grid                                   | choice (and range) only; a continuous parameter is refused   |
| nsgaii, nsgaiii   | refused                                | multi-objective samplers; an Azure sweep optimises one metric|

Pruner (hydra.sweeper.pruner) -> early_termination. Azure counts intervals in
reports of the primary metric (one per epoch: the trainer logs full_valid_loss at
each epoch's end), Optuna counts optimizer steps, so the step-based settings
(n_warmup_steps, interval_steps, min_resource, n_startup_trials) are not carried
over; the Azure settings are read from the pruner's config under Azure's names
when present, else the defaults below:

| Optuna pruner                 | Azure ML policy            | parameters (defaults)                                                    |
|-------------------------------|----------------------------|--------------------------------------------------------------------------|
| none / nop                    | none                       |                                                                          |
| median                        | MedianStoppingPolicy       | evaluation_interval (1), delay_evaluation (1)                            |
| successive_halving, hyperband | BanditPolicy               | slack_factor (0.1) or slack_amount, evaluation_interval (1), delay_evaluation (1) |
| percentile                    | TruncationSelectionPolicy  | truncation_percentage = 100 - percentile, evaluation_interval, delay_evaluation |
| threshold, patient, wilcoxon  | refused                    | no Azure ML counterpart                                                  |

delay_evaluation defaults to 1 so no trial is stopped on its first report, as the
local sweep never prunes at the first evaluation. Successive halving keeps the
best 1/reduction_factor of trials per rung; Azure's closest policy, Bandit, keeps
the trials within slack_factor of the best so far, so the two are not equivalent
and the slack is Azure's documented example value unless given.

Limits: n_trials -> max_total_trials, n_jobs -> max_concurrent_trials,
timeout (s) -> timeout, backend.timeout_minutes -> trial_timeout.
Objective: primary_metric `full_valid_loss` (or hydra.sweeper.metric, if one of the
metrics the trainer logs), goal from `direction`.
Everything refused raises PhituneError before a request is built or sent.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import OmegaConf

from phitune.errors import PhituneError
from phitune.redact import override_key

PRIMARY_METRIC = "full_valid_loss"
# What the trainer logs to MLflow, so what Azure can read as a primary metric.
METRICS = ("full_valid_loss", "full_valid_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
           "train_loss", "train_mean_token_accuracy", "perplexity")

_SAMPLER_CLASSES = {"TPESampler": "tpe", "RandomSampler": "random", "GridSampler": "grid", "CmaEsSampler": "cmaes",
                    "QMCSampler": "qmc", "NSGAIISampler": "nsgaii", "NSGAIIISampler": "nsgaiii",
                    "GPSampler": "gp", "BruteForceSampler": "bruteforce"}
_PRUNER_CLASSES = {"MedianPruner": "median", "SuccessiveHalvingPruner": "successive_halving",
                   "HyperbandPruner": "hyperband", "NopPruner": "none", "PercentilePruner": "percentile",
                   "ThresholdPruner": "threshold", "PatientPruner": "patient", "WilcoxonPruner": "wilcoxon"}
# What Azure ML's Bayesian sampling accepts (its documentation: "Bayesian sampling only
# supports choice, uniform, and quniform distributions" and no early termination policy);
# any other space or a pruner gets random sampling, which takes both.
BAYESIAN_KINDS = {"choice", "uniform", "quniform"}
GRID_KINDS = {"choice"}


@dataclass(frozen=True)
class Param:
    path: str  # config path, e.g. train.learning_rate_multiplier
    name: str  # search-space name, e.g. train_learning_rate_multiplier
    kind: str  # uniform | loguniform | quniform | qloguniform | choice
    distribution: Any  # azure.ai.ml.sweep distribution
    cast_int: bool  # bind as int(${{search_space.name}})
    source: str  # the Hydra expression it came from
    values: tuple = ()  # choice values, or (low, high) of an interval


def search_space_name(path: str) -> str:
    """`train.learning_rate_multiplier` -> `train_learning_rate_multiplier` (Azure input names are identifiers)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.lstrip("+~"))
    return name if re.match(r"[A-Za-z_]", name) else "p_" + name


def translate_param(path: str, expr: str):
    """A Param for a sweep expression, or the fixed override string `path=value` for a plain value.

    The expression is parsed by phitune.sweep.space, the grammar the local sweeper uses, so
    the same expression means the same values on both backends (and fails the same way).
    """
    from azure.ai.ml.sweep import Choice, LogUniform, QLogUniform, QUniform, Uniform

    from phitune.sweep import space

    if not space.parse_override(path, str(expr)).is_sweep_override():
        return f"{path}={expr}"
    dim = space.parse_dimension(path, str(expr))
    name, src = search_space_name(path), str(expr)
    if dim.kind == "choice" or dim.enumerated:  # choice(), range(): the listed values
        values = tuple(dim.values(path))
        return Param(path, name, "choice", Choice(values=list(values)), False, src, values)
    lo, hi = dim.low, dim.high
    if dim.log:
        # Azure's LogUniform/QLogUniform take the bounds of log(value), natural log.
        if dim.kind == "int":
            return Param(path, name, "qloguniform", QLogUniform(min_value=math.log(lo), max_value=math.log(hi), q=1),
                         True, src, (lo, hi))
        return Param(path, name, "loguniform", LogUniform(min_value=math.log(lo), max_value=math.log(hi)), False, src,
                     (lo, hi))
    if dim.kind == "int":
        return Param(path, name, "quniform", QUniform(min_value=lo, max_value=hi, q=1), True, src, (lo, hi))
    return Param(path, name, "uniform", Uniform(min_value=float(lo), max_value=float(hi)), False, src,
                 (float(lo), float(hi)))


def _get(obj, key: str, default=None):
    if obj is None:
        return default
    if OmegaConf.is_config(obj):
        return OmegaConf.select(obj, key, default=default)
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _plain(obj) -> dict:
    if obj is None:
        return {}
    if OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True) or {}
    if isinstance(obj, Mapping):
        return dict(obj)
    return {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_") and not callable(getattr(obj, k))}


def _named(value, classes: dict, what: str) -> "tuple[str, dict]":
    """(name, options) from "tpe", {"name": "tpe", ...} or {"_target_": "optuna.samplers.TPESampler", ...}."""
    if value is None:
        return "none", {}
    if isinstance(value, str):
        return value.strip().lower(), {}
    opts = _plain(value)
    name = opts.pop("name", None) or opts.pop("type", None)
    target = opts.pop("_target_", None)
    if not name and target:
        cls = str(target).rsplit(".", 1)[-1]
        name = classes.get(cls, cls)
    if not name:
        raise PhituneError(f"hydra.sweeper.{what}: cannot tell which {what} this is: {value!r}")
    return str(name).strip().lower(), opts


@dataclass(frozen=True)
class Sampling:
    algorithm: Any  # azure.ai.ml.sweep sampling algorithm
    sampler: str  # the Optuna sampler asked for
    note: Optional[str] = None  # what was translated and why, when Azure ML has no equivalent


# Optuna's model-based samplers -> the name Azure ML's note gives them.
MODEL_BASED = {"tpe": "TPE", "gp": "Gaussian-process", "cmaes": "CMA-ES"}
POLICY_NAMES = {"MedianStoppingPolicy": "median stopping policy", "BanditPolicy": "bandit policy",
                "TruncationSelectionPolicy": "truncation selection policy"}


def sampling_algorithm(sampler, params: list = (), policy=None) -> Sampling:
    """Azure ML's sampling for the Optuna sampler, the search space and the early-termination policy.

    Refuses (PhituneError) only what no Azure sampling can run: multi-objective samplers, and
    grid over a continuous parameter.
    """
    from azure.ai.ml.sweep import BayesianSamplingAlgorithm, GridSamplingAlgorithm, RandomSamplingAlgorithm

    name, opts = _named(sampler if sampler is not None else "tpe", _SAMPLER_CLASSES, "sampler")
    seed = int(opts["seed"]) if opts.get("seed") is not None else None
    if name in MODEL_BASED:
        why = _not_bayesian(params, policy)
        if not why:
            return Sampling(BayesianSamplingAlgorithm(), name, f"Azure ML has no {MODEL_BASED[name]} sampler; "
                            "sampling=bayesian, Azure's model-based sampler (the space is choice/uniform/quniform "
                            "and there is no pruner)")
        kept, disallowed = why
        return Sampling(RandomSamplingAlgorithm(seed=seed), name,
                        f"Azure ML has no {MODEL_BASED[name]} sampler; sampling=random keeps {' and '.join(kept)} "
                        f"(Azure's bayesian sampling allows {_neither(disallowed)})")
    if name == "random":
        return Sampling(RandomSamplingAlgorithm(seed=seed), name)
    if name == "qmc":
        qmc_type = str(opts.get("qmc_type", "sobol")).lower()
        note = None if qmc_type == "sobol" else (f"Azure ML has no {qmc_type} sequence; sampling=random with "
                                                 "rule=sobol, the quasi-random sequence Azure has")
        return Sampling(RandomSamplingAlgorithm(rule="sobol", seed=seed), name, note)
    if name in ("grid", "bruteforce"):
        bad = [p for p in params if p.kind not in GRID_KINDS]
        if bad:
            listing = ", ".join(f"{p.path}={p.source} ({p.kind})" for p in bad)
            raise PhituneError(f"Azure ML grid sampling accepts only choice (or range), not {listing}. Nothing was "
                               "sent; use choice(...)/range(...) for these, or hydra.sweeper.sampler.name=random")
        note = None if name == "grid" else "Azure ML has no brute-force sampler; sampling=grid runs every combination"
        return Sampling(GridSamplingAlgorithm(), name, note)
    if name in ("nsgaii", "nsgaiii"):
        raise PhituneError(f"hydra.sweeper.sampler={name}: a multi-objective sampler; an Azure ML sweep job optimises "
                           f"one metric ({PRIMARY_METRIC}); set hydra.sweeper.sampler.name=tpe or random with "
                           "backend=azureml, or run this sweep with backend=local")
    raise PhituneError(f"hydra.sweeper.sampler={name}: Azure ML sweep jobs have no {name} sampling and phitune knows "
                       "no nearest one (Azure offers bayesian, random (incl. sobol) and grid); set "
                       "hydra.sweeper.sampler.name=tpe, random, qmc or grid with backend=azureml, or run this sweep "
                       "with backend=local")


def _not_bayesian(params, policy):
    """None if Azure's bayesian sampling takes this space and pruner; else (what random keeps, what bayesian lacks)."""
    kept, disallowed = [], []
    bad = [p for p in params if p.kind not in BAYESIAN_KINDS]
    for kind in dict.fromkeys(p.kind for p in bad):
        paths = ", ".join(p.path for p in bad if p.kind == kind)
        kept.append(f"the {_KIND_WORDS[kind]} {paths}")
        disallowed.append(_KIND_WORDS[kind])
    if policy is not None:
        kept.append(f"the {POLICY_NAMES.get(type(policy).__name__, 'early-termination policy')}")
        disallowed.append("early termination")
    return (kept, disallowed) if kept else None


_KIND_WORDS = {"loguniform": "log-uniform", "qloguniform": "log-uniform integer", "uniform": "uniform",
               "quniform": "integer", "choice": "choice"}


def _neither(items: list) -> str:
    return f"no {items[0]}" if len(items) == 1 else "neither " + " nor ".join(items)


def early_termination(pruner):
    """(azure early termination policy or None, optuna pruner name)."""
    from azure.ai.ml.sweep import BanditPolicy, MedianStoppingPolicy, TruncationSelectionPolicy

    name, opts = _named(pruner, _PRUNER_CLASSES, "pruner")
    interval = int(opts.get("evaluation_interval", 1))
    # Never stop a trial on its first full_valid_loss report (the first epoch is the noisiest),
    # as the local sweep's n_warmup_steps never prunes at the first evaluation.
    delay = int(opts.get("delay_evaluation", 1))
    if interval < 1 or delay < 0:
        raise PhituneError("hydra.sweeper.pruner: evaluation_interval must be >= 1 and delay_evaluation >= 0")
    if name in ("none", "nop", "null", ""):
        return None, "none"
    if name == "median":
        return MedianStoppingPolicy(evaluation_interval=interval, delay_evaluation=delay), name
    if name in ("successive_halving", "successivehalving", "hyperband"):
        if opts.get("slack_amount") is not None:
            return BanditPolicy(slack_amount=float(opts["slack_amount"]), evaluation_interval=interval,
                                delay_evaluation=delay), name
        slack = float(opts.get("slack_factor", 0.1))
        if slack <= 0:
            raise PhituneError("hydra.sweeper.pruner.slack_factor must be > 0")
        return BanditPolicy(slack_factor=slack, evaluation_interval=interval, delay_evaluation=delay), name
    if name == "percentile":
        pct = float(opts.get("percentile", 25.0))
        truncation = int(opts.get("truncation_percentage", round(100 - pct)))
        if not 1 <= truncation <= 99:
            raise PhituneError(f"hydra.sweeper.pruner: truncation_percentage={truncation} must be in 1..99")
        return TruncationSelectionPolicy(truncation_percentage=truncation, evaluation_interval=interval,
                                         delay_evaluation=delay), name
    raise PhituneError(f"hydra.sweeper.pruner={name}: Azure ML has no equivalent early-termination policy "
                       "(it offers median stopping, bandit and truncation selection); set hydra.sweeper.pruner.name="
                       "median, successive_halving, hyperband, percentile or none with backend=azureml")


def goal(direction) -> str:
    if isinstance(direction, (list, tuple)) or (OmegaConf.is_list(direction) if OmegaConf.is_config(direction) else False):
        items = list(direction)
        if len(items) != 1:
            raise PhituneError("hydra.sweeper.direction: Azure ML sweep jobs optimise one metric "
                               f"({PRIMARY_METRIC}); a multi-objective direction is not supported")
        direction = items[0]
    text = str(getattr(direction, "name", direction) or "minimize").lower()
    if text not in ("minimize", "maximize"):
        raise PhituneError(f"hydra.sweeper.direction={direction}: expected minimize or maximize")
    return text


def primary_metric(sweeper_cfg) -> str:
    """hydra.sweeper.metric (default full_valid_loss), which must be a metric the trainer logs."""
    metric = str(_get(sweeper_cfg, "metric", PRIMARY_METRIC) or PRIMARY_METRIC)
    if metric not in METRICS:
        raise PhituneError(f"hydra.sweeper.metric={metric}: Azure ML reads the primary metric from the trial's MLflow "
                           f"run, which logs {', '.join(METRICS)}")
    return metric


def translate(params: Mapping[str, str]) -> "tuple[list, list]":
    """(sweep Params, fixed overrides) for the sweeper's params; names checked for collisions."""
    swept, fixed, names = [], [], {}
    for path, expr in params.items():
        result = translate_param(str(path), str(expr))
        if isinstance(result, str):
            fixed.append(result)
            continue
        if result.name in names or result.name in ("train_file", "validation_file"):
            raise PhituneError(f"sweep parameters {names.get(result.name, result.name)} and {path} map to the same "
                               f"Azure search-space name {result.name}")
        names[result.name] = path
        swept.append(result)
    if not swept:
        raise PhituneError("the sweep has no parameter to search (hydra.sweeper.params is empty)")
    return swept, fixed


def _user_overrides(overrides: Optional[list], params: Mapping[str, str]) -> list:
    """The non-sweep command-line overrides; sweep expressions and swept keys are dropped."""
    from phitune.sweep import space

    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except ValueError:  # Hydra not initialised (tests, direct calls)
            overrides = []
    keys = {str(k).lstrip("+~") for k in params}
    out = []
    for ov in overrides:
        key = override_key(ov)
        if key in keys:
            continue
        if "=" in ov and space.parse_override(key, ov.split("=", 1)[1]).is_sweep_override():
            print(f"note: {ov}: a sweep expression outside hydra.sweeper.params; not sent to Azure", file=sys.stderr)
            continue
        out.append(ov)
    return out


def _epoch_candidates(params: list):
    """The epochs values a trial can run (for the cost estimate: the largest counts); None = train.epochs."""
    for p in params:
        if p.path == "train.epochs":
            if p.kind == "choice":
                return list(p.values)
            return [int(math.floor(p.values[1]))]
    return None


def build_sweep_job(cfg, params: Mapping[str, str], sweeper_cfg, settings, overrides: Optional[list] = None):
    """The azure.ai.ml SweepJob for the sweep (built offline; nothing is sent)."""
    from azure.ai.ml import command

    from phitune.azure.command_job import (
        DATA_INPUTS, _input, data_inputs, environment, experiment_name, job_tags, preemptible,
        project_root, remote_overrides, shell_join,
    )
    from phitune.azure.redact import check_overrides, safe_env

    swept, fixed = translate(params)
    policy, _ = early_termination(_get(sweeper_cfg, "pruner"))
    sampling = sampling_algorithm(_get(sweeper_cfg, "sampler", "tpe"), swept, policy)
    objective_goal = goal(_get(sweeper_cfg, "direction", "minimize"))
    metric = primary_metric(sweeper_cfg)
    n_trials = int(_get(sweeper_cfg, "n_trials", 20) or 20)
    n_jobs = int(_get(sweeper_cfg, "n_jobs", 1) or 1)
    timeout = _get(sweeper_cfg, "timeout")
    if n_trials < 1 or n_jobs < 1:
        raise PhituneError("hydra.sweeper.n_trials and n_jobs must be >= 1")
    check_overrides(fixed)

    inputs = {name: _input(path, name) for name, path in data_inputs(cfg).items()}
    bindings = [f"{key}=${{{{inputs.{name}}}}}" for key, name in DATA_INPUTS.items() if name in inputs]
    swept_args = [f"{p.path}=int(${{{{inputs.{p.name}}}}})" if p.cast_int else f"{p.path}=${{{{inputs.{p.name}}}}}"
                  for p in swept]
    outputs, tier_args, queue = preemptible(settings)
    replaced = {*DATA_INPUTS, *(p.path for p in swept), *(override_key(a) for a in tier_args)}
    user = remote_overrides(_user_overrides(overrides, params), replaced=replaced)
    fixed = [f for f in fixed if override_key(f) not in replaced]
    cmd = f"python train.py {shell_join([*user, *fixed, 'backend=local', *bindings, *swept_args, *tier_args])}"

    defaults = {}
    for p in swept:
        current = OmegaConf.select(cfg, p.path, default=None)
        defaults[p.name] = current if isinstance(current, (int, float, str)) and not isinstance(current, bool) \
            else (p.values[0] if p.values else 0)
    root = project_root(settings.code_dir)
    trial = command(
        command=cmd,
        code=str(root),
        inputs={**inputs, **defaults},
        environment=environment(settings),
        environment_variables=safe_env({"PYTHONPATH": "src"}),
        compute=settings.compute,
        instance_type=settings.instance_type,
        instance_count=settings.instance_count,
        outputs=outputs,  # low_priority: each trial's checkpoints, so a preempted trial resumes
    )
    trial = trial(**{p.name: p.distribution for p in swept})
    node = trial.sweep(
        sampling_algorithm=sampling.algorithm,
        primary_metric=metric,
        goal=objective_goal,
        early_termination_policy=policy,
        compute=settings.compute,
        queue_settings=queue,
    )
    node.set_limits(
        max_total_trials=n_trials,
        max_concurrent_trials=n_jobs,
        timeout=int(timeout) if timeout else None,  # seconds, the whole sweep
        trial_timeout=int(settings.timeout_minutes) * 60 if settings.timeout_minutes else None,  # seconds
    )
    job = node._to_job()
    job.experiment_name = experiment_name(cfg, settings)
    job.display_name = settings.display_name
    job.description = f"phitune sweep: {n_trials} trials of python train.py, {metric} {objective_goal}"
    job.tags = job_tags(cfg, settings, "sweep")
    if sampling.note:
        job.tags["phitune.translation"] = sampling.note  # what Azure runs instead of the sampler asked for
    return job


def submit_sweep(config, params: dict, sweeper_cfg, *, overrides: Optional[list] = None, credential=None,
                 transport=None, sleep=None) -> None:
    """Called by phitune's Optuna sweeper for `python train.py -m backend=azureml`.

    `params`: Hydra-Optuna expressions keyed by config path; `sweeper_cfg`: n_trials,
    sampler, direction, pruner, timeout, n_jobs. `overrides`: the command line's
    non-sweep overrides (default: Hydra's task overrides). Dry run writes
    <backend.output_dir>/sweep_job.yaml. Returns None: the objective lives in Azure.
    """
    import time

    from phitune.azure import cost
    from phitune.azure.command_job import data_inputs, dump_job, is_remote_uri, tier_note
    from phitune.azure.redact import install_log_filter
    from phitune.azure.settings import backend_settings
    from phitune.azure.workspace import azure_errors, follow, ml_client, raise_if_failed, require_sdk, studio_url

    require_sdk()
    install_log_filter()
    settings = backend_settings(config.backend)
    if settings.name != "azureml":
        raise PhituneError(f"backend={settings.name}: sweeps run on Azure ML only (backend=azureml); "
                           "Foundry serverless fine-tuning has no sweep")
    if not settings.dry_run:
        from phitune.azure.settings import require_workspace

        require_workspace(settings, "azureml")
    job = build_sweep_job(config, params, sweeper_cfg, settings, overrides=overrides)  # refusals happen here
    for note in (f"note: {job.tags['phitune.translation']}" if "phitune.translation" in job.tags else None,
                 tier_note(settings)):
        if note:
            print(note, file=sys.stderr)
    n_trials = int(_get(sweeper_cfg, "n_trials", 20) or 20)
    remote = any(is_remote_uri(p) for k, p in data_inputs(config).items() if k != "model_path")
    swept, _ = translate(params)
    cost.preflight(config, settings, trials=n_trials, epochs=_epoch_candidates(swept), remote_data=remote)
    if settings.dry_run:
        path = dump_job(job, Path(settings.output_dir) / "sweep_job.yaml")
        print(f"dry run: wrote {path} (submit it with: az ml job create -f {path}); nothing was submitted")
        return None
    with azure_errors("sweep on backend=azureml"):
        client = ml_client(settings, credential=credential, transport=transport)
        created = client.jobs.create_or_update(job)
        print(f"submitted Azure ML sweep job {created.name}: {studio_url(created) or '(no studio link returned)'}")
        if settings.follow:
            final = follow(client, created.name, settings.poll_seconds, sleep=sleep or time.sleep)
            raise_if_failed(final)
    return None
