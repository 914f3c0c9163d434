"""Pruners on the training-progress axis (phitune.sweep.axis), from `hydra.sweeper.pruner`.

The sweeper stores the settings on the study as plain JSON (pruner_spec); each job
rebuilds the pruner from them (build_pruner), in its own process or machine. Every
pruner is wrapped in ProgressPruner, which holds the parts that depend on a trial's
length:

- warmup: no pruning before a trial has trained `warmup` of its own planned tokens
  (median, percentile, wilcoxon, threshold): a 3-epoch trial is judged from 0.3
  epochs with warmup 0.1, a 1-epoch trial from 0.1;
- finish_from (every pruner): a trial that has trained `finish_from` of its own planned
  tokens is never pruned: stopping it there saves little of its cost and may lose a
  near-best result (with 0.7, a 3-epoch trial finishes from 2.1 epochs, a 1-epoch one
  from 0.7);
- same_length (successive halving, median, percentile): a trial is compared only with
  trials of the same planned length. At equal tokens a shorter trial looks better (its
  learning rate has decayed further: a 2-epoch trial at 0.9 epoch is 45% into its decay, a
  3-epoch one 30%), so against every trial a rung keeps short trials and cuts long ones
  that would have finished better;
- successive halving and Hyperband count resources in the reported steps (tokens for
  train.py): min_resource `auto` = the first report point (K tokens, the same for all
  trials), Hyperband's max_resource `auto` = the longest planned trial so far.

For an app that reports its own steps (phitune.sweep.report) and records no planned
length, warmup does nothing and `auto` is Optuna's own estimate.

Wilcoxon compares a trial with the best trial report by report (a paired signed-rank
test over the steps both have). It is made for steps that are problem instances (a
value per evaluation example or fold, whose mean is the objective), not for a training
curve, whose points are neither independent nor comparable to the final value; it is
available for apps that report that way.
"""
from __future__ import annotations

from typing import Any

import optuna

from phitune.errors import PhituneError
from phitune.sweep.axis import PLANNED_ATTR, REPORT_TOKENS_ATTR

PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "wilcoxon", "threshold", "none")
_WARMUP_APPLIES = ("median", "percentile", "wilcoxon", "threshold")
_SAME_LENGTH_APPLIES = ("median", "percentile", "successive_halving")  # they read the study's trials


def pruner_spec(conf) -> dict:
    """hydra.sweeper.pruner -> plain JSON, validated (each bad value names its setting)."""
    name = str(conf.name).lower()
    if name in ("nop", "null", "off", "false"):
        name = "none"
    if name not in PRUNERS:
        raise PhituneError(f"hydra.sweeper.pruner.name={name!r}: expected one of {', '.join(PRUNERS)}")
    # Reports are made without a pruner too: Optuna's intermediate-values plot shows them.
    common = {"name": name, "report_every": _fraction(conf, "report_every", upper=1000.0),
              "report_examples": _at_least(conf, "report_examples", 1)}
    if name == "none":
        return common
    common["finish_from"] = _fraction(conf, "finish_from", upper=1.0)
    # As warmup, a setting of the pruners it applies to: `pruner.name=hyperband` on the command
    # line works on top of sweeps/default.yaml's same_length.
    if name in _SAME_LENGTH_APPLIES and bool(_value(conf, "same_length")):
        common["same_length"] = True
    if name in _WARMUP_APPLIES:
        common["warmup"] = _fraction(conf, "warmup", zero_ok=True, upper=1.0)
    if name in ("median", "percentile"):
        spec = dict(common, n_startup_trials=_at_least(conf, "n_startup_trials", 0),
                    n_warmup_steps=_at_least(conf, "n_warmup_steps", 0), interval_steps=_at_least(conf, "interval_steps", 1),
                    n_min_trials=_at_least(conf, "n_min_trials", 1))
        if name == "percentile":
            pct = float(_value(conf, "percentile"))
            if not 0.0 < pct < 100.0:
                raise PhituneError(f"hydra.sweeper.pruner.percentile={pct}: expected a number between 0 and 100")
            spec["percentile"] = pct
        return spec
    if name == "successive_halving":
        return dict(common, min_resource=_resource(conf, "min_resource"),
                    reduction_factor=_at_least(conf, "reduction_factor", 2),
                    min_early_stopping_rate=_at_least(conf, "min_early_stopping_rate", 0),
                    bootstrap_count=_at_least(conf, "bootstrap_count", 0))
    if name == "hyperband":
        return dict(common, min_resource=_resource(conf, "min_resource"), max_resource=_resource(conf, "max_resource"),
                    reduction_factor=_at_least(conf, "reduction_factor", 2),
                    bootstrap_count=_at_least(conf, "bootstrap_count", 0))
    if name == "wilcoxon":
        p = float(_value(conf, "p_threshold"))
        if not 0.0 < p < 1.0:
            raise PhituneError(f"hydra.sweeper.pruner.p_threshold={p}: expected a p-value between 0 and 1")
        return dict(common, p_threshold=p, n_startup_steps=_at_least(conf, "n_startup_steps", 0))
    lower, upper = _value(conf, "lower"), _value(conf, "upper")
    if lower is None and upper is None:
        raise PhituneError("hydra.sweeper.pruner.name=threshold needs pruner.lower or pruner.upper")
    return dict(common, lower=None if lower is None else float(lower), upper=None if upper is None else float(upper),
                n_warmup_steps=_at_least(conf, "n_warmup_steps", 0))


def _value(conf, key: str):
    return conf.get(key) if hasattr(conf, "get") else getattr(conf, key, None)


def _at_least(conf, key: str, low: int) -> int:
    value = _value(conf, key)
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise PhituneError(f"hydra.sweeper.pruner.{key}={value!r}: expected a whole number >= {low}") from None
    if out < low:
        raise PhituneError(f"hydra.sweeper.pruner.{key}={out}: expected a whole number >= {low}")
    return out


def _fraction(conf, key: str, zero_ok: bool = False, upper: float = 1.0) -> float:
    value = _value(conf, key)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise PhituneError(f"hydra.sweeper.pruner.{key}={value!r}: expected a number") from None
    if not ((0.0 <= out if zero_ok else 0.0 < out) and out <= upper):
        raise PhituneError(f"hydra.sweeper.pruner.{key}={out}: expected a fraction "
                           f"{'>= 0' if zero_ok else '> 0'} and <= {upper:g}")
    return out


def _resource(conf, key: str) -> Any:
    value = _value(conf, key)
    if str(value) == "auto":
        return "auto"
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise PhituneError(f"hydra.sweeper.pruner.{key}={value!r}: expected auto or a number of steps "
                           "(training tokens for phitune's train.py)") from None
    if out < 1:
        raise PhituneError(f"hydra.sweeper.pruner.{key}={out}: expected auto or a number of steps >= 1")
    return out


def build_pruner(spec: dict | None):
    """pruner_spec(...) -> a pruner. A study without a spec (not created by phitune) is not pruned."""
    spec = dict(spec or {"name": "none"})
    if spec.get("name", "none") == "none":
        return optuna.pruners.NopPruner()
    return ProgressPruner(spec)


class ProgressPruner(optuna.pruners.BasePruner):
    """Optuna's pruner of the spec, with the warm-up and resources of phitune's axis.

    The Optuna pruner is built at the first decision, when the trial's planned length
    and report interval are known (the job records them before its first report)."""

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        self.name = self.spec["name"]
        self._inner = None

    def prune(self, study, trial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        warmup = float(self.spec.get("warmup") or 0.0)
        planned = trial.user_attrs.get(PLANNED_ATTR)
        if warmup and planned and step < warmup * float(planned):
            return False
        if planned and step >= float(self.spec.get("finish_from", 1.0)) * float(planned):
            return False
        if self._inner is None:
            self._inner = self._build(study, trial)
        if self.spec.get("same_length") and planned:
            study = _SameLength(study, planned)
        return bool(self._inner.prune(study, trial))

    def _build(self, study, trial):
        s = {k: v for k, v in self.spec.items() if k not in ("name", "report_every", "report_examples", "warmup",
                                                          "finish_from", "same_length")}
        if self.name == "median":
            return optuna.pruners.MedianPruner(**s)
        if self.name == "percentile":
            return optuna.pruners.PercentilePruner(**s)
        if self.name == "threshold":
            return optuna.pruners.ThresholdPruner(**s)
        if self.name == "wilcoxon":
            return optuna.pruners.WilcoxonPruner(**s)
        every = trial.user_attrs.get(REPORT_TOKENS_ATTR)
        if s.get("min_resource") == "auto":
            # The first report point, the same for every trial; Optuna's own estimate otherwise.
            s["min_resource"] = int(every) if every else ("auto" if self.name == "successive_halving" else 1)
        if self.name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**s)
        if s.get("max_resource") == "auto":
            lengths = [t.user_attrs.get(PLANNED_ATTR) for t in study.get_trials(deepcopy=False)]
            lengths = [int(n) for n in lengths if n]
            if lengths:
                s["max_resource"] = max(lengths)
        return optuna.pruners.HyperbandPruner(**s)


class _SameLength:
    """The study as an Optuna pruner reads it, holding only the trials planned as long as
    `planned` (tokens): the competitors of a rung, or the completed trials of a median."""

    def __init__(self, study, planned):
        self._study, self._planned = study, planned

    def get_trials(self, deepcopy: bool = True, states=None):
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if t.user_attrs.get(PLANNED_ATTR) == self._planned]

    def __getattr__(self, name):  # direction, _storage (where successive halving records a rung)
        return getattr(self._study, name)
