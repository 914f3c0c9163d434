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


def chunked_token_stats(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                        chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token_stats from the last hidden states, never holding the [tokens, vocab] logits.

    Only the labelled positions go through `head` (the lm_head), `chunk_tokens` at a time;
    each chunk runs under torch.utils.checkpoint, so its float32 logits are freed after
    the forward and recomputed in the backward: the peak is one chunk's logits (2,048
    tokens x 32,064 classes x 4 B = 263 MB) instead of the row's (24k tokens: 3.1 GB,
    several times over for the softmax and its gradient). Costs one more head forward.
    """
    from torch.utils.checkpoint import checkpoint

    h, y = labelled_positions(hidden, labels)
    ce = hidden[:, :1, :1].sum().float() * 0  # keeps a graph when no token is labelled
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for s in range(0, y.numel(), chunk_tokens):
        c, k = checkpoint(_chunk_stats, h[s:s + chunk_tokens], y[s:s + chunk_tokens], head, use_reentrant=False)
        ce, correct = ce + c, correct + k
    return ce, correct, torch.as_tensor(y.numel(), device=hidden.device)


def labelled_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, hidden] states that predict a label, [n] those labels), after the causal shift."""
    shift_labels = labels[:, 1:].reshape(-1)
    mask = shift_labels != -100
    return hidden[:, :-1, :].reshape(-1, hidden.size(-1))[mask], shift_labels[mask]


def _chunk_stats(h: torch.Tensor, y: torch.Tensor, head: torch.nn.Module):
    logits = head(h).float()
    return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(-1) == y).sum()
