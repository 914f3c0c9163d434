"""What the training loop calls for task=classification (LoopSpec.task): batches, loss, evaluation.

A step's loss is the summed cross-entropy of its examples divided by the step's example
count (the loop's `units`), as chat divides by labelled tokens: accumulation and device
count don't change it. task.class_weights=balanced weights class c by n / (k * n_c)
(scikit-learn's "balanced"), from the training labels.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F

from phitune.classify import encode
from phitune.classify.metrics import scores


def balanced_weights(train_labels, n_classes: int) -> list[float]:
    """n / (k * n_c) per class; a class without training examples gets 0 (it cannot be learnt)."""
    counts = Counter(int(y) for y in train_labels)
    n = sum(counts.values())
    return [n / (n_classes * counts[c]) if counts[c] else 0.0 for c in range(n_classes)]


class ClassifyOps:
    accuracy = "accuracy"  # train_accuracy in the step rows

    def __init__(self, n_classes: int, class_weights: list[float] | None = None):
        self.n_classes = n_classes
        self.class_weights = class_weights

    def pack(self, examples) -> dict:
        return encode.pack(examples)

    def units(self, batch) -> int:
        return int(batch["class_labels"].numel())

    def logits(self, model, batch, amp=None):
        ctx = torch.autocast(batch["input_ids"].device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], last=batch["last"]).float()

    def forward(self, model, batch, amp=None):
        """(summed cross-entropy, correct predictions, examples) of one packed row."""
        logits, y = self.logits(model, batch, amp), batch["class_labels"]
        weight = torch.tensor(self.class_weights, device=logits.device) if self.class_weights else None
        ce = F.cross_entropy(logits, y, weight=weight, reduction="sum")
        return ce, (logits.argmax(-1) == y).sum(), torch.tensor(y.numel())

    @torch.no_grad()
    def evaluate(self, model, rows: list, dist, amp=None) -> dict:
        """{loss, accuracy, macro_f1} over packed rows of examples (this rank's share; summed over ranks)."""
        ce = 0.0
        matrix = torch.zeros(self.n_classes, self.n_classes, dtype=torch.float64)
        for examples in rows:
            batch = {k: v.to(dist.device) for k, v in self.pack(examples).items()}
            logits, y = self.logits(model, batch, amp), batch["class_labels"]
            ce += float(F.cross_entropy(logits, y, reduction="sum"))  # unweighted: comparable across settings
            idx = (y * self.n_classes + logits.argmax(-1)).cpu()
            matrix.view(-1).index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
        ce, *flat = dist.all_sum(ce, *matrix.view(-1).tolist())
        matrix = torch.tensor(flat).view(self.n_classes, self.n_classes)
        n = float(matrix.sum())
        if n == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan")}
        result = scores(matrix.numpy())
        return {"loss": ce / n, "accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}
