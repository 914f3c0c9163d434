"""`packed_sdpa`: attention over a packed row, one example at a time.

A packed row holds several examples end to end, with position_ids restarting at 0
and no attention mask. transformers' own sdpa path turns that into a dense [T, T]
block-diagonal mask and the kernel computes all T^2 scores: 8 examples of ~185
tokens are T^2 = 2.2M scores per head and layer where the examples need
sum(L^2) = 0.29M. This runs causal SDPA on each example's slice instead (same
logits; tests/test_encode_pack.py checks them against padding), and tells
transformers not to build the [T, T] mask at all. Anything else (a padding mask, a
KV-cache decode step, more than one row) goes to transformers' own sdpa.
Measured in bench/README.md ("Training throughput").
"""
from __future__ import annotations

import torch

NAME = "phitune_packed_sdpa"
CONFIG_NAME = "packed_sdpa"  # what model.attn_implementation says in conf/model/*.yaml


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                          sliding_window=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # query/key/value: [batch, heads, tokens, head_dim]
    if attention_mask is not None or position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    bounds = _bounds(kwargs.get("cu_seq_lens_q"), position_ids, query.shape[2])
    if key.shape[1] != query.shape[1]:  # grouped-query attention: one k/v head serves several q heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    dropout = dropout if module.training else 0.0
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        if sliding_window and e - s > sliding_window:
            # as transformers: key j is visible from query i iff i - window < j <= i
            i = torch.arange(e - s, device=q.device)
            keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout,
                                                                         scale=scaling))
        else:
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                                         is_causal=True))
    # transformers expects [batch, tokens, heads, head_dim]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


_LAST: list = [None, None]  # (cu_seq_lens tensor, its bounds as ints): one host copy per batch, not per layer


def _bounds(cu, position_ids, total: int) -> list[int]:
    """The packed examples' boundaries [0, L1, L1+L2, ..., T]: from pack()'s cu_seq_lens (read to
    the host once per batch: every layer gets the same tensor), else from the position ids."""
    if cu is not None and int(cu.numel()) >= 2:
        if _LAST[0] is not cu:
            _LAST[:] = [cu, [int(x) for x in cu.tolist()]]
        if _LAST[1][-1] == total:
            return _LAST[1]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return starts + [total]


def _packed_mask(*args, attention_mask=None, q_length=None, kv_length=None, **kwargs):
    """No [T, T] mask when the attention above slices the row itself; transformers' sdpa mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, _packed_mask)
    return NAME


FLASH = "flash_attention_2"


def resolve(attn: str | None, device=None) -> str | None:
    """Config value -> the name transformers knows (registering phitune's own on first use).

    flash_attention_2 needs a CUDA device and the flash-attn package; without them, packed_sdpa
    (same logits) with a one-line note."""
    if attn == FLASH and device is not None:
        why = _flash_missing(device)
        if why:
            from phitune.train.forward import note_once

            note_once(f"model.attn_implementation={FLASH}: {why}; using {CONFIG_NAME}")
            attn = CONFIG_NAME
    return register() if attn == CONFIG_NAME else attn


def _flash_missing(device) -> str | None:
    import importlib.util

    if torch.device(device).type != "cuda":
        return f"no CUDA device ({device})"
    return None if importlib.util.find_spec("flash_attn") else "flash-attn is not installed"
