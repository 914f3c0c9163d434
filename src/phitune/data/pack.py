"""Batches: padding-free packing (training) and classic padding, plus the seeded batch plan.

Packing puts a micro-batch's examples end to end in ONE row, with position_ids
restarting at 0 for each example and no attention_mask. transformers
(masking_utils.find_packed_sequence_indices, used by create_causal_mask for the
sdpa, eager and flex paths) reads a position that does not follow its
predecessor by +1 as the start of a new sequence and builds a block-diagonal
causal mask, so no example attends to another. It only does so when the forward
pass gets attention_mask=None and no KV cache: call the model with
`use_cache=False` (phitune's load_model also sets config.use_cache=False).

No compute is spent on padding, and the loss is the mean over the labelled tokens
of the whole micro-batch, exactly as for the padded batch of the same examples
(tests/test_encode_pack.py checks losses and logits against padding).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from phitune.chat import IGNORE_INDEX, Encoded


def _check(batch: Sequence[Encoded]) -> None:
    if not batch:
        raise ValueError("empty batch")
    for i, ex in enumerate(batch):
        if not ex.input_ids:
            raise ValueError(f"example {i} of the batch has no tokens")
        if len(ex.input_ids) != len(ex.labels):
            raise ValueError(f"example {i}: {len(ex.input_ids)} input ids but {len(ex.labels)} labels")


def pack(batch: Sequence[Encoded]) -> dict:
    """{"input_ids", "labels", "position_ids"}, each a long tensor [1, T], T = total tokens,
    plus the row's sequence boundaries, computed here once per batch on the CPU under the
    names transformers' attention reads (flash-attn varlen; phitune's packed_sdpa):
    "cu_seq_lens_q"/"cu_seq_lens_k" (int32 [examples + 1], 0, L1, L1+L2, ..., T) and
    "max_length_q"/"max_length_k" (int, the longest example).

    The first label of every example is IGNORE_INDEX: after the causal shift it
    would be predicted from the previous example's last token.
    """
    _check(batch)
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in batch:
        ids.extend(ex.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(ex.labels[1:])
        positions.extend(range(len(ex.input_ids)))
    cu = torch.tensor(np.cumsum([0] + [len(ex.input_ids) for ex in batch]), dtype=torch.int32)
    longest = max(len(ex.input_ids) for ex in batch)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
    }


def pad(batch: Sequence[Encoded], pad_id: int) -> dict:
    """{"input_ids", "attention_mask", "labels"}: long tensors [B, Lmax], right-padded.

    Labels are IGNORE_INDEX on padding and on each example's first token (never
    predicted), so padded and packed batches carry the same labelled tokens.
    """
    _check(batch)
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, 1:n] = torch.tensor(ex.labels[1:], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plan_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices shuffled for (seed, epoch) and cut into groups of batch_size (last may be short).

    A pure function of its arguments: a run resumed at epoch k replays exactly the
    order an uninterrupted run would have used.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(lengths)).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def bound_by_tokens(groups: Sequence[Sequence[int]], lengths: Sequence[int], max_tokens: int | None,
                    max_examples: int | None = None) -> list[list[int]]:
    """The examples of `groups` (one optimizer step's micro-batches) re-cut into packed rows of
    at most `max_tokens` tokens and `max_examples` examples (train.max_device_tokens,
    train.max_device_batch); `groups` unchanged when max_tokens is None.

    First-fit decreasing: long examples open rows, short ones fill the gaps, so a step of
    sixteen 3,000-token examples under 8,192 tokens runs 8 rows of 2, not 16 of 1. The
    rows hold exactly the step's examples and the loss is summed over labelled tokens and
    divided by the step's count, so the step's loss and gradient do not change.
    """
    if max_tokens is None:
        return [list(g) for g in groups]
    rows: list[list[int]] = []
    free: list[int] = []  # tokens left in each row
    for i in sorted((i for g in groups for i in g), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than max_tokens={max_tokens}")
        r = next((r for r, room in enumerate(free) if room >= n and (not max_examples or len(rows[r]) < max_examples)),
                 None)
        if r is None:
            rows.append([])
            free.append(int(max_tokens))
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= n
    return rows
