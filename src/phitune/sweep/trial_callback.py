"""What phitune's training loop tells its sweep trial: tokens trained, and the validation
loss at each report point of the training-progress axis (phitune.sweep.axis).

The report is the loss on the first `report_examples` validation examples, the same
examples for every trial, so that two trials compared at the same point differ by their
training only (the loop's own valid_loss cycles through batches whose size follows the
trial's batch size). No report is made at the trial's last step: a trial that has
trained everything it planned is complete, and pruning it would only lose its result.
"""
from __future__ import annotations

from phitune.sweep.axis import ReportPoints, planned_tokens, report_interval
from phitune.train.callbacks import Callback

REPORT_BATCH = 8  # examples per forward pass of a report's evaluation (the loss does not depend on it)


class TrialCallback(Callback):
    def __init__(self, reporter, model, valid_examples: list, device, train_examples: list, spec, key: str = "loss"):
        """`spec`: the run's LoopSpec (epochs, batch plan, max_steps, seed) to size the whole trial;
        `key`: what evaluate() result is reported, in the study's direction (task=classification: macro_f1)."""
        self.key = key
        self.reporter, self.model, self.device, self.spec = reporter, model, device, spec
        lengths = [len(e.input_ids) for e in train_examples]
        self.planned = planned_tokens(lengths, spec.plan, spec.epochs, spec.max_steps, spec.seed)
        settings = reporter.pruner_spec
        self.points = None
        every = None
        if valid_examples:
            every = report_interval(sum(lengths), settings.get("report_every", 0.1))
            self.points = ReportPoints(every)
            n = min(len(valid_examples), int(settings.get("report_examples", 16)))
            self.examples = valid_examples[:n]
            self.groups = [list(range(i, min(i + REPORT_BATCH, n))) for i in range(0, n, REPORT_BATCH)]
        reporter.plan(self.planned, every)
        self._tokens = 0

    def on_step(self, step: int, metrics: dict) -> None:
        tokens = int(metrics["train_tokens"])
        self.reporter.add_tokens(tokens - self._tokens)
        self._tokens = tokens
        point = self.points.crossed(tokens) if self.points is not None else None
        if point is not None and tokens < self.planned:
            self.reporter.report(self._loss(), point)

    def _loss(self) -> float:
        from phitune.train.distributed import Dist
        from phitune.train.loop import evaluate

        # One process: callbacks run on the main rank only. The spec: the run's memory settings and task.
        return float(evaluate(self.model, self.examples, REPORT_BATCH, Dist(device=self.device), self.groups,
                              spec=self.spec)[self.key])
