"""Stop rule `hydra.sweeper.stop.max_cost`: what a local sweep's trials cost, from their wall time.

    cost of a trial = wall hours x GPUs it used x hydra.sweeper.stop.price_per_gpu_hour

Wall hours run from the trial's start (the sweeper asks it) to its end (told), as the study
records them, so a resumed study or one shared by several workers counts every worker's
trials. GPUs: 1 per trial, since the sweeper gives each parallel trial one GPU
(phitune.sweep.devices); a trial on the CPU counts as one device. Every trial that ran
counts: complete, pruned, failed, retried.

Before each trial starts:

    cost so far + estimate of the next trial > max_cost   ->  stop: no new trial starts
    estimate = mean cost of the complete and pruned trials (none before one finishes: start)

A running trial (another worker's, or an earlier one of this batch) counts at the larger of
its cost so far and the estimate: it will likely cost a whole trial.

backend=azureml checks its own budget before anything is submitted (backend.max_cost and
backend.price_per_node_hour, phitune.azure.cost): these settings are for local sweeps only.
Amounts are in `stop.currency`, a label the prices are given in.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from omegaconf import OmegaConf

from phitune.errors import PhituneError

GPUS_PER_TRIAL = 1  # one GPU each (phitune.sweep.devices), or the CPU as one device
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class CostRule:
    price_per_gpu_hour: float  # in `currency`
    max_cost: float | None  # None: the cost is recorded, nothing stops on it
    currency: str


@dataclass(frozen=True)
class CostCheck:
    """The decision before one trial: spent so far, the next trial's estimate, and whether it fits."""

    spent: float
    estimate: float | None  # None before any complete or pruned trial
    fits: bool

    def line(self, rule: CostRule, then: str) -> str:
        """`cost so far 0.42 USD, next trial ~0.10 USD, max_cost 0.50: starting trial 5`."""
        nxt = f"~{money(self.estimate)} {rule.currency}" if self.estimate is not None else "~? (none finished yet)"
        return (f"cost so far {money(self.spent)} {rule.currency}, next trial {nxt}, "
                f"max_cost {money(rule.max_cost)}: {then}")


def money(amount: float | None) -> str:
    """Two decimals; fewer than a cent keeps two significant digits (a CPU trial costs ~0.001)."""
    if amount is None:
        return "-"
    return f"{amount:.2f}" if amount == 0 or abs(amount) >= 0.01 else f"{amount:.2g}"


def cost_rule(settings) -> CostRule | None:
    """hydra.sweeper.stop.{max_cost, price_per_gpu_hour, currency}, checked; None when no price is set."""
    price = OmegaConf.select(settings, "stop.price_per_gpu_hour", default=None)
    limit = OmegaConf.select(settings, "stop.max_cost", default=None)
    currency = str(OmegaConf.select(settings, "stop.currency", default=None) or "USD")
    if price is not None and not float(price) >= 0:
        raise PhituneError(f"hydra.sweeper.stop.price_per_gpu_hour={price}: expected 0 or more "
                           f"(what one GPU costs for one hour, in {currency})")
    if limit is not None and not float(limit) > 0:
        raise PhituneError(f"hydra.sweeper.stop.max_cost={limit}: expected more than 0 ({currency})")
    if limit is not None and price is None:
        raise PhituneError(f"hydra.sweeper.stop.max_cost={limit} needs a price to count the cost: set "
                           f"hydra.sweeper.stop.price_per_gpu_hour (what one GPU costs for one hour, in {currency})")
    if price is None:
        return None
    return CostRule(float(price), None if limit is None else float(limit), currency)


def trial_hours(trial, now: dt.datetime) -> float:
    """Wall hours of a trial: start to end, or to now while it runs; 0 before it starts."""
    if trial.datetime_start is None:
        return 0.0
    end = trial.datetime_complete or now
    return max(0.0, (end - trial.datetime_start).total_seconds()) / SECONDS_PER_HOUR


def trial_cost(trial, rule: CostRule, now: dt.datetime) -> float:
    return trial_hours(trial, now) * GPUS_PER_TRIAL * rule.price_per_gpu_hour


def spent(trials, rule: CostRule, now: dt.datetime | None = None) -> float:
    """What every trial that ran has cost so far (running ones up to now)."""
    now = now or dt.datetime.now()  # Optuna records naive local times
    return sum(trial_cost(t, rule, now) for t in trials)


def check(trials, rule: CostRule, now: dt.datetime | None = None) -> CostCheck:
    """May one more trial start within rule.max_cost?"""
    from optuna.trial import TrialState

    now = now or dt.datetime.now()
    done = [trial_cost(t, rule, now) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    estimate = sum(done) / len(done) if done else None
    total = 0.0
    for t in trials:
        cost = trial_cost(t, rule, now)
        if t.state == TrialState.RUNNING and estimate is not None:
            cost = max(cost, estimate)  # it will likely run a whole trial
        total += cost
    fits = rule.max_cost is None or estimate is None or total + estimate <= rule.max_cost
    return CostCheck(total, estimate, fits)


def describe(trials, rule: CostRule, now: dt.datetime | None = None) -> str:
    """`1.23 USD: 0.00034 GPU-hours x 3600 USD per GPU-hour` (the parent run's tag)."""
    now = now or dt.datetime.now()
    hours = sum(trial_hours(t, now) for t in trials) * GPUS_PER_TRIAL
    return (f"{money(spent(trials, rule, now))} {rule.currency}: {hours:.4g} GPU-hours x "
            f"{rule.price_per_gpu_hour:g} {rule.currency} per GPU-hour")


def refuse_on_azure(settings) -> None:
    """backend=azureml: these settings would be ignored there; name the ones that apply."""
    for key in ("max_cost", "price_per_gpu_hour"):
        value = OmegaConf.select(settings, f"stop.{key}", default=None)
        if value is not None:
            raise PhituneError(f"hydra.sweeper.stop.{key}={value} is for local sweeps: backend=azureml estimates a "
                               "sweep's cost before submitting it; set backend.max_cost and "
                               "backend.price_per_node_hour (with backend.estimated_hours or backend.tokens_per_second)")
