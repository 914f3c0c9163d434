"""`packed_sdpa` on its own path: no [T, T] mask, and the same logits as padding with a
sliding window (Phi-3-mini attends within a 2,047-token window)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from phitune.chat import encode_example
from phitune.data.pack import pack, pad
from phitune.modeling.loader import load_model

CONVS = [
    [{"role": "user", "content": "Where is my invoice for last month, please?"},
     {"role": "assistant", "content": "Go to Account, then Billing history, and download the PDF."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "Can I export a board to CSV?"},
     {"role": "assistant", "content": "Yes: open the board menu and choose Export, then CSV."}],
]
WINDOW = 8  # tokens; every example above is longer, so the window cuts into each one


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    encs = [encode_example(tiny_tokenizer, c, max_len=512) for c in CONVS]
    assert min(len(e) for e in encs) > 2 * WINDOW
    return encs


def _model(tiny_model_cfg, attn: str, **config):
    model = load_model(OmegaConf.merge(tiny_model_cfg, {"attn_implementation": attn, "torch_dtype": "float32"}))
    for key, value in config.items():
        setattr(model.config, key, value)
    return model.eval()


class MaskSpy:
    """Records the [.., q, k] shape of every attention mask SDPA is given."""

    def __init__(self, monkeypatch):
        self.shapes: list[tuple] = []
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, **kw):
            self.shapes.append(None if attn_mask is None else tuple(attn_mask.shape[-2:]))
            return real(q, k, v, attn_mask=attn_mask, **kw)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


@pytest.mark.parametrize("window", [None, WINDOW])
def test_packed_sdpa_builds_no_full_row_mask(tiny_model_cfg, examples, monkeypatch, window):
    model = _model(tiny_model_cfg, "packed_sdpa", sliding_window=window)
    batch = pack(examples)
    total = batch["input_ids"].shape[1]
    spy = MaskSpy(monkeypatch)
    with torch.no_grad():
        model(**batch, use_cache=False)
    layers = model.config.num_hidden_layers
    assert len(spy.shapes) == layers * len(examples)  # one SDPA call per example and layer
    assert all(shape is None or shape[0] < total for shape in spy.shapes), spy.shapes
    if window is None:
        assert set(spy.shapes) == {None}  # causal kernels, no mask tensor at all

    # the spy sees a full-row mask when there is one: transformers' own sdpa on the same row
    spy.shapes.clear()
    with torch.no_grad():
        _model(tiny_model_cfg, "sdpa", sliding_window=window)(**batch, use_cache=False)
    assert (total, total) in spy.shapes


def test_packed_matches_padded_with_a_sliding_window(tiny_model_cfg, tiny_tokenizer, examples):
    packed, padded = pack(examples), pad(examples, tiny_tokenizer.pad_token_id)
    model = _model(tiny_model_cfg, "packed_sdpa", sliding_window=WINDOW)
    reference = _model(tiny_model_cfg, "eager", sliding_window=WINDOW)
    with torch.no_grad():
        got = model(**packed, use_cache=False).logits
        want = reference(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        unwindowed = _model(tiny_model_cfg, "eager", sliding_window=None)(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    start = 0
    for row, ex in enumerate(examples):
        n = len(ex)
        torch.testing.assert_close(got[0, start:start + n], want[row, :n], rtol=1e-4, atol=1e-4)
        start += n
    # the window really changes the logits here, so the comparison above can fail
    assert not torch.allclose(want[0, :len(examples[0])], unwindowed[0, :len(examples[0])], atol=1e-3)
