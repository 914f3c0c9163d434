"""Memory at long context: token-bounded rows, gradient checkpointing, the chunked loss, bf16 on CPU."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from phitune.chat import encode_example
from phitune.config import TrainConfig
from phitune.data.pack import bound_by_tokens, pack
from phitune.errors import PhituneError
from phitune.modeling import attention, loader
from phitune.train import memory
from phitune.train.distributed import Dist
from phitune.train.forward import autocast_dtype, forward_stats
from phitune.train.loop import LoopSpec, fit
from phitune.train.schedule import BatchPlan


def _chat(k: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {k}: " + "how do I export? " * k},
            {"role": "assistant", "content": f"Answer {k}: " + "open Settings, then Export. " * (k + 1)}]


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return [encode_example(tiny_tokenizer, _chat(k), 512) for k in range(1, 9)]


def _lora_model(tiny_model_cfg, dropout=0.0, seed=0, **train):
    torch.manual_seed(seed)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"lora": {"rank": 4, "alpha": 8, "dropout": dropout}, **train})
    model = loader.apply_training_method(loader.load_model(tiny_model_cfg), cfg, tiny_model_cfg)
    for name, p in model.named_parameters():  # lora_B starts at 0, which would leave lora_A's gradient 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    return model


def _lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a: dict, b: dict, atol=1e-6, rtol=1e-4):
    assert a.keys() == b.keys() and a
    assert any(g.abs().max() > 0 for g in a.values())  # not a vacuous pass on zero gradients
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=rtol, msg=n)


# --- the chunked loss -----------------------------------------------------------------------

def test_chunked_loss_equals_plain_loss_and_gradients_without_full_logits(tiny_model_cfg, examples):
    batch = pack(examples)
    model = _lora_model(tiny_model_cfg)
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))

    ce, k, n = forward_stats(model, batch)
    ce.backward()
    plain = _lora_grads(model)
    assert head_rows == [batch["input_ids"].shape[1]]  # the plain loss: logits for every token
    model.zero_grad()
    head_rows.clear()

    ce2, k2, n2 = forward_stats(model, batch, loss_chunk_tokens=16)
    ce2.backward()
    assert int(n2) == int(n) > 100 and int(k2) == int(k)
    torch.testing.assert_close(ce2, ce, rtol=1e-5, atol=1e-4)
    _assert_same(plain, _lora_grads(model))
    # no call of the head ever saw more than one chunk; the model's own lm_head call saw none
    assert max(head_rows) <= 16 and 0 in head_rows
    assert sum(r for r in head_rows if r) == 2 * int(n)  # each chunk's forward, recomputed once in the backward


# --- gradient checkpointing -----------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients_with_lora_and_packing(tiny_model_cfg, examples):
    batch = pack(examples[:5])
    grads, calls = [], []
    for on in (False, True):
        model = _lora_model(tiny_model_cfg, dropout=0.1)  # dropout: the recomputation must draw the same masks
        if on:
            memory.enable_gradient_checkpointing(model)
        layer = model.get_base_model().get_decoder().layers[0]
        count, real = [], layer.mlp.forward  # inside the layer: runs again in the recomputation (hooks do not)

        def counted(*a, _real=real, _count=count, **kw):
            _count.append(1)
            return _real(*a, **kw)

        layer.mlp.forward = counted
        torch.manual_seed(1)
        ce, _, _ = forward_stats(model, batch, loss_chunk_tokens=64)
        ce.backward()
        grads.append(_lora_grads(model))
        calls.append(len(count))
    assert calls == [1, 2]  # with checkpointing the layer ran again in the backward
    _assert_same(grads[0], grads[1])


# --- token-bounded micro-batches ------------------------------------------------------------

def test_bound_by_tokens_rows_never_exceed_the_cap_and_hold_the_same_examples():
    lengths = [3000, 2900, 120, 4000, 800, 64, 3100, 1500, 700, 4096]
    groups = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    rows = bound_by_tokens(groups, lengths, 4096, max_examples=3)
    assert sorted(i for r in rows for i in r) == list(range(10))
    assert all(sum(lengths[i] for i in r) <= 4096 and len(r) <= 3 for r in rows)
    assert len(rows) < 10  # short examples share rows with long ones
    assert bound_by_tokens(groups, lengths, None) == groups
    with pytest.raises(ValueError):
        bound_by_tokens(groups, lengths, 4000)


def _one_step(tiny_model_cfg, examples, max_device_tokens, rows: list):
    model = _lora_model(tiny_model_cfg)
    model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[1]), with_kwargs=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    spec = LoopSpec(epochs=1, plan=BatchPlan(8, 4, 2, 1), seed=3, eval_steps=0, max_steps=1, max_grad_norm=0.0,
                    full_eval_each_epoch=False, progress=False, max_device_tokens=max_device_tokens,
                    loss_chunk_tokens=32)
    state = fit(model, opt, sched, examples, [], spec, Dist())
    return state.history[0]["train_loss"], {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_max_device_tokens_bounds_every_row_and_leaves_the_step_unchanged(tiny_model_cfg, examples):
    lengths = [len(e.input_ids) for e in examples]
    cap = max(lengths) + 10
    assert 2 * cap < sum(lengths) / 2  # the cap really splits the 4-example micro-batches
    free_rows, capped_rows = [], []
    loss_a, params_a = _one_step(tiny_model_cfg, examples, None, free_rows)
    loss_b, params_b = _one_step(tiny_model_cfg, examples, cap, capped_rows)
    assert len(free_rows) == 2 and max(free_rows) > cap  # without the cap a row is longer
    assert len(capped_rows) > 2 and max(capped_rows) <= cap
    assert sum(capped_rows) == sum(free_rows) == sum(lengths)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    start = {n: p for n, p in _lora_model(tiny_model_cfg).named_parameters() if p.requires_grad}
    assert any((params_a[n] - start[n]).abs().max() > 1e-4 for n in start)  # the step moved the adapter
    _assert_same({n: params_a[n] - start[n] for n in start}, {n: params_b[n] - start[n] for n in start},
                  atol=1e-6, rtol=1e-3)


def test_a_max_device_tokens_below_the_longest_example_is_refused_before_compute():
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"max_device_tokens": 1024})
    with pytest.raises(PhituneError, match=r"train.max_device_tokens=1024.*4096 tokens.*data.max_seq_len=1024"):
        memory.check_settings(cfg, longest=4096, max_len=4096)
    memory.check_settings(cfg, longest=1000, max_len=4096)
    with pytest.raises(PhituneError, match="train.loss_chunk_tokens=0"):
        memory.check_settings(OmegaConf.merge(cfg, {"loss_chunk_tokens": 0}), longest=10, max_len=4096)
    with pytest.raises(PhituneError, match="train.mixed_precision=fp8"):
        memory.check_settings(OmegaConf.merge(cfg, {"mixed_precision": "fp8"}), longest=10, max_len=4096)


# --- bf16 on CPU, fallbacks -----------------------------------------------------------------

@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_runs_on_cpu_with_lora_weights_in_float32(tiny_model_cfg, examples, base_dtype):
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"lora": {"rank": 4, "alpha": 8, "dropout": 0.0}})
    model = loader.apply_training_method(loader.load_model(tiny_model_cfg, dtype=base_dtype), cfg, tiny_model_cfg)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    before = {n: p.detach().clone() for n, p in lora.items()}
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.AdamW(lora.values(), lr=1e-2)
    amp = autocast_dtype("bf16", "cpu")
    for _ in range(2):
        ce, _, n = forward_stats(model, pack(examples[:3]), loss_chunk_tokens=64, autocast=amp)
        assert torch.isfinite(ce) and ce.dtype == torch.float32
        (ce / n).backward()
        opt.step()
        opt.zero_grad()
    assert torch.bfloat16 in seen  # the matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert all(s.dtype == torch.float32 for st in opt.state.values() for s in st.values() if s.dim())
    assert any((lora[n] - before[n]).abs().max() > 0 for n in lora)


def test_mixed_precision_auto_is_off_on_cpu():
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("off", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16


def test_flash_attention_without_cuda_falls_back_to_packed_sdpa_with_a_note(capsys):
    assert attention.resolve("flash_attention_2", "cpu") == attention.NAME
    assert "model.attn_implementation=flash_attention_2: no CUDA device (cpu); using packed_sdpa" in capsys.readouterr().err
    assert attention.resolve("sdpa", "cpu") == "sdpa"


def test_compile_without_a_compiler_runs_eagerly_with_a_note(tiny_model_cfg, monkeypatch, capsys):
    import shutil

    model = _lora_model(tiny_model_cfg)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    loader.compile_layers(model, "cpu")
    assert "train.compile=true: no C++ compiler found; the model runs eagerly" in capsys.readouterr().err
    assert not any(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
                   for layer in model.get_base_model().get_decoder().layers)


def test_packed_sdpa_reads_the_rows_boundaries_from_pack_once_per_batch(examples):
    batch = pack(examples[:3])
    lengths = [len(e.input_ids) for e in examples[:3]]
    cu = batch["cu_seq_lens_q"]
    want = [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    # position_ids=None: the boundaries can only come from cu_seq_lens (no per-layer nonzero())
    assert attention._bounds(cu, None, sum(lengths)) == want
    assert attention._LAST[0] is cu  # kept for the next layer of the same batch
    # a row that is not the packed batch's (e.g. another caller): from its position ids
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    assert attention._bounds(cu, pos, 5) == [0, 3, 5]
