"""Tokens of a classification example, and packing several into one row for the head.

An example is its chat-template rendering with the generation prompt (`<|assistant|>`
last): the head reads the hidden state of that final token, which has attended to
the whole conversation, as a causal LM's answer would start from it. Longer than
max_len: the FIRST tokens are dropped, so the end that the head reads survives.

pack() puts a micro-batch end to end in one row, position_ids restarting at 0 per
example (the same block-diagonal attention as chat packing, phitune.data.pack), and
records each example's last position: no compute is spent on padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from phitune.chat import tokenize_chat


@dataclass
class ClassEncoded:
    input_ids: list[int]
    label: int  # class id; -1 when unknown (inference)

    def __len__(self) -> int:
        return len(self.input_ids)


def input_ids(tokenizer, messages, max_len: int) -> list[int]:
    ids = tokenize_chat(tokenizer, messages, add_generation_prompt=True).input_ids
    return ids[-max_len:] if max_len and len(ids) > max_len else ids


def count_input_tokens(tokenizer, messages) -> int:
    return len(tokenize_chat(tokenizer, messages, add_generation_prompt=True).input_ids)


def encode_examples(tokenizer, examples, labels: list[str], max_len: int) -> list[ClassEncoded]:
    """phitune.data.dataset.Example (with .label) -> ClassEncoded, class id = position in `labels`."""
    ids = {name: i for i, name in enumerate(labels)}
    return [ClassEncoded(input_ids(tokenizer, ex.messages, max_len), ids[ex.label]) for ex in examples]


def pack(batch: Sequence[ClassEncoded]) -> dict:
    """{"input_ids", "position_ids"}: [1, T]; {"last"}: [B] index of each example's final token in
    the row; {"class_labels"}: [B]."""
    if not batch:
        raise ValueError("empty batch")
    ids, positions, last = [], [], []
    for ex in batch:
        if not ex.input_ids:
            raise ValueError("an example of the batch has no tokens")
        ids.extend(ex.input_ids)
        positions.extend(range(len(ex.input_ids)))
        last.append(len(ids) - 1)
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "last": torch.tensor(last, dtype=torch.long),
            "class_labels": torch.tensor([ex.label for ex in batch], dtype=torch.long)}


def pad(batch: Sequence[ClassEncoded], pad_id: int) -> dict:
    """The padded equivalent (right padding, attention_mask): the reference packing must equal,
    and the layout of the padded benchmark."""
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        ids[row, :len(ex.input_ids)] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[row, :len(ex.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "last": mask.sum(1) - 1,
            "class_labels": torch.tensor([ex.label for ex in batch], dtype=torch.long)}
