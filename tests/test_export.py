"""`phitune export`: a peft adapter folder or a merged model that plain transformers loads,
whose greedy answers equal the served model's.

The model is the tiny Phi-3 with a LoRA adapter whose both matrices are random
(peft's init_lora_weights=False), so the adapter visibly changes the answers: an
export that lost it would fail the comparison (checked below as a guard).
"""
from __future__ import annotations

import json

import pytest

from phitune.cli import main

PROMPT = [{"role": "user", "content": "How do I reset my password?"}]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_cfg, tmp_path_factory):
    """A peft adapter folder on the tiny base (adapter_config.json + adapter_model.safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from phitune.modeling.loader import load_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(tiny_model_cfg), LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        init_lora_weights=False, task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("adapter") / "epoch-001"
    model.save_pretrained(str(folder))
    return folder


def greedy(generator, max_tokens=12):
    return generator.generate(PROMPT, max_tokens=max_tokens, temperature=0.0)["text"]


@pytest.fixture(scope="module")
def served_answer(adapter_dir, tiny_model_cfg):
    from phitune.modeling.generate import load_generator
    from phitune.models.uri import resolve

    served = load_generator(resolve(str(adapter_dir), model_cfg=tiny_model_cfg))
    base = load_generator(_base_source(tiny_model_cfg))
    answer = greedy(served)
    assert answer != greedy(base), "guard: the adapter must change the greedy answer"
    return answer


def _base_source(tiny_model_cfg):
    from phitune.modeling.loader import base_reference
    from phitune.models.uri import ModelSource

    ref = dict(base_reference(tiny_model_cfg), context_length=int(tiny_model_cfg.context_length))
    return ModelSource("base", "base", "folder", ref, None)


def test_merged_export_loads_with_plain_transformers_and_answers_as_served(adapter_dir, served_answer, tmp_path,
                                                                            capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phitune.modeling.generate import ChatGenerator

    out = tmp_path / "merged"
    assert main(["export", str(adapter_dir), "--out", str(out), "--merged", "--model", "tiny-phi3",
                 "--check-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "as a merged model (float32)" in printed and "equal the served model's on 3 prompts" in printed
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "README.md"} <= names
    assert any(n.endswith(".safetensors") for n in names) and not any(n.endswith((".bin", ".pt")) for n in names)
    assert "adapter_config.json" not in names  # merged: no peft needed
    assert not list(tmp_path.glob(".merged.tmp-*"))  # the temporary folder became DIR

    model = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, no phitune, no peft
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template and "<|assistant|>" in tokenizer.chat_template
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert greedy(ChatGenerator(model.eval(), tokenizer, 512)) == served_answer

    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "vllm serve DIR" in card and "convert_hf_to_gguf.py" in card
    assert "| yes |" in card and "| NO |" not in card


def test_adapter_export_is_a_peft_folder_with_tokenizer_and_card(adapter_dir, served_answer, tiny_model_cfg, tmp_path,
                                                                  capsys):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from phitune.modeling.generate import ChatGenerator
    from phitune.modeling.loader import load_model

    out = tmp_path / "adapter"
    out.mkdir()  # an empty folder is fine
    assert main(["export", str(adapter_dir), "--out", str(out), "--model", "tiny-phi3", "--check-tokens", "12"]) == 0
    assert "as a LoRA adapter" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "README.md"} <= names
    assert "config.json" not in names  # the base is not copied
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"

    model = PeftModel.from_pretrained(load_model(tiny_model_cfg), str(out)).eval()
    model.config.use_cache = True
    assert greedy(ChatGenerator(model, AutoTokenizer.from_pretrained(str(out)), 512)) == served_answer
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "--enable-lora --lora-modules" in card and "convert_lora_to_gguf.py" in card
    assert "rank 4, alpha 8" in card


def test_an_export_that_answers_differently_is_refused(adapter_dir, tiny_model_cfg, tmp_path, monkeypatch):
    from phitune import export
    from phitune.errors import PhituneError
    from phitune.modeling.generate import load_generator
    from phitune.models.uri import resolve

    monkeypatch.setattr(export, "_reload", lambda *a: load_generator(_base_source(tiny_model_cfg)))  # adapter lost
    out = tmp_path / "bad"
    with pytest.raises(PhituneError, match="answers differently from the served model"):
        export.export_model(resolve(str(adapter_dir), model_cfg=tiny_model_cfg), out, merged=True, max_tokens=12)
    assert not out.exists()


def test_bad_export_requests_fail_before_loading(adapter_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    assert main(["export", "models:/nope@champion", "--out", str(taken)]) == 1
    err = capsys.readouterr().err
    assert "exists and is not an empty folder" in err and "Traceback" not in err and "loading" not in err
    assert main(["export", str(adapter_dir), "--out", str(tmp_path / "a"), "--dtype", "bfloat16"]) == 1
    assert "only with --merged" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "b"), "--model", "tiny-phi3"]) == 1
    assert "not a model folder" in capsys.readouterr().err
