"""The pruning axis: training progress in tokens, the same for every trial of a sweep.

An optimizer step of batch 32 sees four times the data of a step of batch 8, so the
pruner must not compare trials by step index. phitune's train.py reports its trial's
validation loss against the training tokens it has seen, at report points every
`report_every` of an epoch:

    K = round(report_every x tokens of one epoch)     e.g. 0.1 x 92,160 = 9,216 tokens
    report steps = K, 2K, 3K, ...                    (Optuna's int step, in tokens)

Every trial of a sweep trains on the same data, so K, and with it the report points,
are the same for all of them: the pruner's comparison at step 2K is between trials
that have each seen 2K tokens (to within one optimizer step: a trial reports at the
first step whose cumulative tokens reach the point). A trial whose steps are larger
than K reports at fewer points, every one of them on the common grid.

A trial also records what it would train if nobody stopped it (planned tokens), so
that warm-up is a fraction of its own length and the parent run can say what an
unpruned sweep would have spent.
"""
from __future__ import annotations

from typing import Sequence

# Trial user attrs, next to study.TOKENS_ATTR (tokens actually trained).
PLANNED_ATTR = "planned_tokens"  # tokens the trial trains when it is not pruned
REPORT_TOKENS_ATTR = "report_tokens"  # K: tokens between two report points


def report_interval(epoch_tokens: int, report_every: float) -> int:
    """K in tokens: `report_every` of an epoch (at least one token)."""
    if not 0 < float(report_every) <= 1000:
        raise ValueError(f"report_every={report_every}: expected a positive fraction of an epoch")
    return max(1, round(float(report_every) * int(epoch_tokens)))


class ReportPoints:
    """Which report point a trial has just passed: the multiples of `every` tokens."""

    def __init__(self, every: int):
        self.every = max(1, int(every))
        self.last = 0

    def crossed(self, tokens: int) -> int | None:
        """The highest point at or below `tokens`, if it is new since the last call; else None."""
        point = int(tokens) // self.every * self.every
        if point > self.last:
            self.last = point
            return point
        return None


def planned_tokens(lengths: Sequence[int], plan, epochs: int, max_steps: int | None, seed: int) -> int:
    """Training tokens of a whole run: what phitune's loop sees over `epochs` (or up to
    `max_steps` optimizer steps), counted as the loop counts them (every token of each
    packed example)."""
    from phitune.data.pack import plan_batches
    from phitune.train.loop import steps_per_epoch

    per_epoch = steps_per_epoch(len(lengths), plan)
    total = per_epoch * int(epochs)
    if not max_steps or int(max_steps) >= total:
        return sum(lengths) * int(epochs)
    full, rest = divmod(int(max_steps), per_epoch)
    tokens = sum(lengths) * full
    if rest:
        groups = plan_batches(lengths, plan.device_batch, seed, full)[:rest * plan.grad_accum * plan.world_size]
        tokens += sum(lengths[i] for g in groups for i in g)
    return tokens
