"""One forward pass of a packed row: (summed cross-entropy, correct predictions, labelled tokens).

Where the memory and precision settings of the `train` group meet (README "GPUs and memory"):

- `train.loss_chunk_tokens`: the model's lm_head is skipped (`logits_to_keep` keeps no
  position) and the loss comes from the decoder's last hidden states, a chunk of labelled
  tokens at a time (phitune.train.tokens.chunked_token_stats); on CUDA with liger-kernel
  installed, Liger's fused linear cross-entropy (a Triton kernel) instead. null: the plain
  loss over the full float32 [tokens, vocab] logits.
- `train.mixed_precision`: bf16 autocast around the forward; the weights keep their own
  dtype, so LoRA adapters (and the optimiser state that follows them) stay float32.
"""
from __future__ import annotations

import contextlib
import inspect
import sys

import torch

from phitune.errors import PhituneError
from phitune.train.tokens import chunked_token_stats, labelled_positions, token_stats

MIXED_PRECISION = ("auto", "bf16", "off")
SEQUENCE_BOUNDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # from pack(), once per batch
_SAID: set = set()


def note_once(line: str) -> None:
    if line not in _SAID:
        _SAID.add(line)
        print(f"note: {line}", file=sys.stderr)


def autocast_dtype(setting: str, device) -> torch.dtype | None:
    """train.mixed_precision -> the autocast dtype, or None (no autocast).

    auto: bf16 on a CUDA device that supports it (Ampere and later), nothing elsewhere
    (CPU bf16 matmuls are slower than float32 on most CPUs); bf16: also on CPU."""
    setting = str(setting or "off").lower()
    if setting not in MIXED_PRECISION:
        raise PhituneError(f"train.mixed_precision={setting}: expected one of {', '.join(MIXED_PRECISION)}")
    device = torch.device(device)
    if setting == "off":
        return None
    if setting == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16


def _parts(model):
    """(decoder, lm_head, forward accepts logits_to_keep) of a model that may be wrapped in DDP and peft."""
    m = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    base = m.get_base_model() if hasattr(m, "get_base_model") else m
    keeps = "logits_to_keep" in inspect.signature(base.forward).parameters
    return base.get_decoder(), base.get_output_embeddings(), keeps


def _liger_loss(device):
    """Liger's fused linear cross-entropy on CUDA, or None (with a one-line note when it is missing)."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        note_once("liger-kernel is not installed: the chunked cross-entropy runs in PyTorch "
                  "(pip install liger-kernel for the fused kernel)")
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")


def forward_stats(model, batch: dict, loss_chunk_tokens: int | None = None, autocast: torch.dtype | None = None):
    """(sum of cross-entropy, correct argmax predictions, labelled tokens) of one packed row."""
    device = batch["input_ids"].device
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    # use_cache=False: with a cache, the packed rows' position_ids would not be read as
    # sequence boundaries and one example would attend to the previous one.
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
              **{k: batch[k] for k in SEQUENCE_BOUNDS if k in batch}}
    if not loss_chunk_tokens:
        with amp:
            out = model(**kwargs)
        return token_stats(out.logits, batch["labels"])
    decoder, head, keeps = _parts(model)
    if not keeps:
        note_once(f"{type(decoder).__name__}: the model's forward has no logits_to_keep; "
                  "train.loss_chunk_tokens is ignored (the plain loss)")
        return forward_stats(model, batch, None, autocast)
    box = []
    hook = decoder.register_forward_hook(lambda mod, args, out: box.append(out[0]))
    try:
        with amp:
            # no position's logits: the head runs below on the labelled tokens only
            model(**kwargs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    finally:
        hook.remove()
    hidden, labels = box[-1], batch["labels"]
    with amp:
        fused = _liger_loss(device) if type(head) is torch.nn.Linear else None
        if fused is None:
            return chunked_token_stats(hidden, head, labels, int(loss_chunk_tokens))
        h, y = labelled_positions(hidden, labels)
        out = fused(head.weight, h, y, head.bias)
        ce = (out if torch.is_tensor(out) else out.loss).float()
        with torch.no_grad():  # accuracy: argmax per chunk, nothing kept for backward
            correct = sum((head(h[s:s + loss_chunk_tokens]).argmax(-1) == y[s:s + loss_chunk_tokens]).sum()
                          for s in range(0, y.numel(), int(loss_chunk_tokens)))
        return ce, torch.as_tensor(correct, device=device), torch.as_tensor(y.numel(), device=device)
