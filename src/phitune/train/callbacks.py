"""The hooks the training loop calls, in a module of their own so that what listens
(MLflow tracking, sweep pruning) depends on this protocol, never on the loop itself."""
from __future__ import annotations


class Callback:
    """Called on the main process only; every method is optional."""

    def on_step(self, step: int, metrics: dict) -> None: ...
    def on_evaluate(self, step: int, metrics: dict) -> None: ...
    # checkpoint_dir: the epoch's checkpoint, written but not yet published (None when not saved)
    def on_epoch_end(self, epoch: int, step: int, metrics: dict, checkpoint_dir) -> None: ...
