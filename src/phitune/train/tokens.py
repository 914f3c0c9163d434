"""Summed next-token loss and accuracy over labelled (assistant) tokens.

Sums, not means: a step's loss is divided by the labelled tokens of the whole step
(all micro-batches, all devices), so accumulation and device count don't change it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy, number of correct argmax predictions, labelled tokens)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                         ignore_index=-100, reduction="sum")
    correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum()
    return ce, correct, mask.sum()


def labelled_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())
