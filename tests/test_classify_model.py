"""The classifier: the head on each packed example's last token, what LoRA trains, the loss
weights, and the metrics against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from phitune.classify.encode import ClassEncoded, input_ids, pack, pad
from phitune.classify.metrics import confusion, scores
from phitune.classify.model import build_classifier
from phitune.classify.ops import ClassifyOps, balanced_weights
from phitune.config import TrainConfig

TEXTS = ["I was charged twice for my invoice", "The board crashes when I drag a card",
         "Where is my parcel? It has not arrived", "please cancel my plan", "hi"]


def _classifier(tiny_model_cfg, tokenizer, method="lora", labels=("a", "b", "c")):
    train = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"method": method, "lora": {"dropout": 0.0}})
    return build_classifier(tiny_model_cfg, train, list(labels), tokenizer.pad_token_id)


def _encoded(tokenizer, texts=TEXTS):
    return [ClassEncoded(input_ids(tokenizer, [{"role": "user", "content": t}], 512), i % 3) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def clf(tiny_model_cfg, tiny_tokenizer):
    torch.manual_seed(0)
    model = _classifier(tiny_model_cfg, tiny_tokenizer)
    with torch.no_grad():  # adapters as after some training, so that they take part in the comparison
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def test_head_reads_each_packed_examples_last_token(clf, tiny_tokenizer):
    examples = _encoded(tiny_tokenizer)
    with torch.no_grad():
        b = pack(examples)
        packed = clf(input_ids=b["input_ids"], position_ids=b["position_ids"], last=b["last"])
        alone = torch.cat([clf(input_ids=torch.tensor([e.input_ids]), last=torch.tensor([len(e) - 1])) for e in examples])
        p = pad(examples, tiny_tokenizer.pad_token_id)
        padded = clf(input_ids=p["input_ids"], attention_mask=p["attention_mask"], last=p["last"])
    assert packed.shape == (len(examples), 3)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone[0], alone[1])  # guard: the examples do differ
    assert b["last"].tolist() == [sum(len(e) for e in examples[:i + 1]) - 1 for i in range(len(examples))]


def test_long_examples_keep_their_end(tiny_tokenizer):
    full = input_ids(tiny_tokenizer, [{"role": "user", "content": "word " * 200}], 10_000)
    cut = input_ids(tiny_tokenizer, [{"role": "user", "content": "word " * 200}], 16)
    assert cut == full[-16:] and tiny_tokenizer.convert_ids_to_tokens(cut[-2]) == "<|assistant|>"


def _train(model, examples, steps=3, weights=None):
    ops = ClassifyOps(3, weights)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        c, _, n = ops.forward(model, pack(examples))
        (c / n).backward()
        opt.step()
        opt.zero_grad()


def test_lora_trains_the_adapter_and_the_head_not_the_base(tiny_model_cfg, tiny_tokenizer):
    model = _classifier(tiny_model_cfg, tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert all("lora_" in n or "score.modules_to_save" in n for n in trainable)
    _train(model, _encoded(tiny_tokenizer))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert any("lora_B" in n for n in changed) and any("score.modules_to_save" in n for n in changed)
    assert not any("layers.0.self_attn.qkv_proj.base_layer" in n for n in changed)  # the base is frozen


def test_full_method_trains_every_weight(tiny_model_cfg, tiny_tokenizer):
    model = _classifier(tiny_model_cfg, tiny_tokenizer, method="full")
    assert all(p.requires_grad for p in model.parameters())
    before = model.model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    _train(model, _encoded(tiny_tokenizer), steps=1)
    assert not torch.equal(before, model.model.model.layers[0].self_attn.qkv_proj.weight)


def test_balanced_weights_and_the_weighted_loss():
    assert balanced_weights([0, 0, 0, 1], 3) == [4 / 9, 4 / 3, 0.0]  # n / (k * n_c); no example: 0
    ops = ClassifyOps(2, [1.0, 3.0])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, position_ids, last):
            return torch.tensor([[2.0, 0.0], [0.0, 1.0]])

    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.zeros(1, 4, dtype=torch.long),
             "last": torch.tensor([1, 3]), "class_labels": torch.tensor([0, 1])}
    ce, correct, n = ops.forward(Fixed(), batch)
    expect = 1.0 * math.log(1 + math.exp(-2.0)) + 3.0 * math.log(1 + math.exp(-1.0))
    assert float(ce) == pytest.approx(expect) and int(correct) == 2 and int(n) == 2


def test_metrics_against_hand_computed_values_with_a_missing_class():
    # classes a, b, c, d: d never occurs and is never predicted; c is predicted but never true
    refs = [0, 0, 0, 1, 1, 1]
    preds = [0, 0, 1, 1, 1, 2]
    r = scores(confusion(refs, preds, 4), ["a", "b", "c", "d"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2 R 2/3 F1 0.8; b: P 2/3 R 2/3 F1 2/3; c: P 0 R 0 F1 0; d: absent from both, left out
    assert r["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert r["per_class"]["b"]["f1"] == pytest.approx(2 / 3)
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)
    assert r["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_the_evaluate_module_loaded_by_path_agrees():
    from phitune.evaluation.suite import load_metric

    refs, preds = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 2]
    out = load_metric("classification").compute(predictions=preds, references=refs, labels=["a", "b", "c", "d"])
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)  # as by hand above (scikit-learn's too)
    assert out["per_class"]["d"]["support"] == 0 and len(out["confusion_matrix"]) == 4


def test_the_loop_trains_a_classifier_and_resumes_it_to_the_same_weights(tiny_model_cfg, tiny_tokenizer, tmp_path):
    from phitune.train.checkpoint import latest_checkpoint, load_checkpoint
    from phitune.train.distributed import Dist
    from phitune.train.loop import LoopSpec, TrainState, fit
    from phitune.train.schedule import plan_batch

    examples = _encoded(tiny_tokenizer, TEXTS * 3)  # 15 examples, 4 per step: 4 steps an epoch
    plan = plan_batch(4, 1, 4)

    def job(out, epochs):
        torch.manual_seed(0)
        model = _classifier(tiny_model_cfg, tiny_tokenizer)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        spec = LoopSpec(epochs=epochs, plan=plan, seed=1, eval_steps=2, output_dir=str(out), progress=False,
                        task=ClassifyOps(3))
        return model, opt, sched, spec

    dist = Dist()
    model, opt, sched, spec = job(tmp_path / "a", 2)
    state = fit(model, opt, sched, examples, examples[:6], spec, dist)
    row = state.history[1]
    assert {"train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_macro_f1"} <= set(row)
    assert "train_mean_token_accuracy" not in row
    assert {"full_valid_loss", "full_valid_accuracy", "full_valid_macro_f1"} <= set(state.epoch_metrics[-1])
    assert "perplexity" not in state.epoch_metrics[-1]

    first, opt1, sched1, spec1 = job(tmp_path / "b", 1)
    fit(first, opt1, sched1, examples, examples[:6], spec1, dist)  # a run stopped after epoch 1
    resumed, opt2, sched2, spec2 = job(tmp_path / "b", 2)
    st = load_checkpoint(latest_checkpoint(tmp_path / "b"), resumed, opt2, sched2)
    assert (latest_checkpoint(tmp_path / "b") / "adapter" / "labels.json").is_file()
    fit(resumed, opt2, sched2, examples, examples[:6], spec2, dist,
        state=TrainState(epoch=st["epoch"], step=st["step"], train_tokens=st["train_tokens"], history=st["history"],
                         epoch_metrics=st["epoch_metrics"]))
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=name)


def test_gradient_checkpointing_reaches_the_wrapped_model(tiny_model_cfg, tiny_tokenizer):
    from phitune.train.memory import enable_gradient_checkpointing

    torch.manual_seed(0)
    plain, ckpt = _classifier(tiny_model_cfg, tiny_tokenizer), _classifier(tiny_model_cfg, tiny_tokenizer)
    ckpt.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(ckpt)
    assert ckpt.model.get_base_model().model.gradient_checkpointing
    batch = pack(_encoded(tiny_tokenizer))
    grads = []
    for m in (plain, ckpt):
        m.train()
        c, _, _ = ClassifyOps(3).forward(m, batch)
        c.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def _compiled(model) -> list[bool]:
    return [getattr(layer, "_compiled_call_impl", None) is not None for layer in model.get_decoder().layers]


@pytest.mark.parametrize("setting", ["true", "false"])
def test_train_compile_compiles_the_classifiers_decoder_layers(repo_root, tiny_model_dir, tmp_path, setting):
    """The recipe's set-up with train.compile: each backbone layer is marked for torch.compile
    (compiling itself happens at the first forward pass: ~3 CPU-minutes, 5 min wall, for the
    tiny model on a loaded 2-core machine, too slow for a test; its losses then equal eager's
    within 3e-7)."""
    from hydra import compose, initialize_config_dir

    import phitune.config  # noqa: F401
    from phitune import recipe
    from phitune.train import distributed

    with initialize_config_dir(config_dir=str(repo_root / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "task=classification", f"data.train_file={repo_root}/data/tickets_train.jsonl", "data.validation=auto",
            f"train.output_dir={tmp_path}/out", f"train.compile={setting}", "backend.device=cpu"])
    dist = distributed.setup("cpu")
    job = recipe._setup_training(cfg, recipe._setup_data(cfg), dist)
    marked = _compiled(job.model)
    assert marked and marked == [setting == "true"] * len(marked)


def test_compile_without_a_compiler_leaves_the_classifier_eager_with_a_note(tiny_model_cfg, tiny_tokenizer,
                                                                            monkeypatch, capsys):
    import shutil

    from phitune.modeling.loader import compile_layers
    from phitune.train import forward

    model = _classifier(tiny_model_cfg, tiny_tokenizer)
    monkeypatch.setattr(forward, "_SAID", set())  # the note is printed once per process
    monkeypatch.setattr(shutil, "which", lambda name: None)
    compile_layers(model, "cpu")
    assert "note: train.compile=true: no C++ compiler found; the model runs eagerly" in capsys.readouterr().err
    assert _compiled(model) == [False] * len(model.get_decoder().layers) and _compiled(model)
