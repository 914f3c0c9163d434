"""Turn the portal's hyperparameters into concrete training numbers.

Azure AI Foundry and OpenAI expose `learning_rate_multiplier`, `batch_size_multiplier`
(or batch size) and `epochs`; the trainer needs a learning rate, a per-device batch,
gradient accumulation and a number of optimizer steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from phitune.errors import PhituneError

# OpenAI's documented heuristic for n_epochs="auto": 3 epochs, unless that gives fewer
# than 100 or more than 25,000 example passes; then scale, clamped to 1..25 epochs.
AUTO_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_EPOCHS, MAX_EPOCHS = 1, 25


def resolve_epochs(epochs, n_examples: int) -> int:
    if isinstance(epochs, str) and epochs.strip().lower() == "auto":
        if n_examples <= 0:
            return AUTO_EPOCHS
        if n_examples * AUTO_EPOCHS < MIN_TARGET_EXAMPLES:
            return min(MAX_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
        if n_examples * AUTO_EPOCHS > MAX_TARGET_EXAMPLES:
            return max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
        return AUTO_EPOCHS
    try:
        value = int(epochs)
    except (TypeError, ValueError):
        raise PhituneError(f"train.epochs: expected a positive integer or 'auto', got {epochs!r}") from None
    if value < 1 or str(value) != str(epochs).strip():
        raise PhituneError(f"train.epochs: expected a positive integer or 'auto', got {epochs!r}")
    return value


@dataclass(frozen=True)
class BatchPlan:
    effective_batch: int  # examples per optimizer step, all devices together
    device_batch: int  # examples packed into one forward pass on one device
    grad_accum: int  # forward passes per optimizer step on each device
    world_size: int

    @property
    def examples_per_step(self) -> int:
        return self.device_batch * self.grad_accum * self.world_size


def plan_batch(base_batch_size: int, batch_size_multiplier: int, max_device_batch: int, world_size: int = 1) -> BatchPlan:
    """effective = base * multiplier, split into device batch x accumulation x devices.

    e.g. base 8 x multiplier 4 = 32 examples/step; 2 GPUs, at most 8 per pass ->
    8 per device x 2 accumulation x 2 devices = 32.
    """
    for name, v in (("model.base_batch_size", base_batch_size), ("train.batch_size_multiplier", batch_size_multiplier),
                    ("train.max_device_batch", max_device_batch)):
        if not isinstance(v, int) or v < 1:
            raise PhituneError(f"{name}: expected a positive integer, got {v!r}")
    effective = base_batch_size * batch_size_multiplier
    per_device = math.ceil(effective / world_size)
    device_batch = min(max_device_batch, per_device)
    grad_accum = math.ceil(per_device / device_batch)
    # Keep the effective batch exact when it divides; otherwise shrink the device batch
    # so that device_batch * grad_accum * world_size is as close as possible from above.
    device_batch = math.ceil(per_device / grad_accum)
    return BatchPlan(effective, device_batch, grad_accum, world_size)


def learning_rate(base_learning_rate: float, multiplier: float) -> float:
    if not multiplier > 0:
        raise PhituneError(f"train.learning_rate_multiplier: expected > 0, got {multiplier!r}")
    return float(base_learning_rate) * float(multiplier)
