"""The tiny Phi-3, the loader (sources, dtype, LoRA/full), inference reload, generation."""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from phitune.config import ModelConfig, TrainConfig
from phitune.chat import encode_example
from phitune.data.pack import pack
from phitune.errors import PhituneError
from phitune.modeling import loader
from phitune.modeling.generate import ChatGenerator
from phitune.modeling import tiny
from phitune.modeling.tiny import PHI3_CHAT_TEMPLATE, TINY_VERSION, build_tiny_phi3, ensure_tiny_phi3

CHAT = [
    {"role": "system", "content": "You are a support assistant."},
    {"role": "user", "content": "How do I reset my password?"},
    {"role": "assistant", "content": "Open Settings, then choose Reset password."},
]


def compose(repo_root: Path, overrides: list[str]):
    from hydra import compose as hcompose, initialize_config_dir

    import phitune.config  # noqa: F401  (registers phitune_base)

    with initialize_config_dir(config_dir=str(repo_root / "conf"), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def train_cfg(method: str = "lora", **lora):
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), {"method": method, "lora": lora})


def packed_batch(tokenizer):
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    return pack([encode_example(tokenizer, CHAT, 256), encode_example(tokenizer, other, 256)])


# --- tiny Phi-3 -------------------------------------------------------------------


def test_tiny_build_is_deterministic(tmp_path, tiny_model_dir):
    """A second build, from a caller with other torch settings, is byte-identical to the cached one.

    (One extra build, not two: the session's tiny_model_dir is the first. Each build
    pretrains for ~35 s of CPU.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the build pins itself to one thread, whatever the caller uses
    try:
        b = build_tiny_phi3(tmp_path / "b")
        # ... and gives the caller its settings back
        assert torch.get_num_threads() == 2
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (tiny_model_dir / name).read_bytes() == (b / name).read_bytes(), name


def test_tiny_is_pretrained(repo_root, tiny_model_dir):
    """The build pretrains: unseen support chats score far below uniform, and the chat format is known."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # data/support_valid.jsonl is fine-tuning data, never in the pretraining corpus
    assert "Tasklane" not in tiny._corpus_text()
    lines = (repo_root / "data/support_valid.jsonl").read_text().splitlines()[:12]
    ce = count = 0.0
    with torch.no_grad():
        for line in lines:
            enc = encode_example(tok, json.loads(line)["messages"], 512)
            labels = torch.tensor([enc.labels])
            n = int((labels[:, 1:] != -100).sum())
            ce += float(model(input_ids=torch.tensor([enc.input_ids]), labels=labels).loss) * n
            count += n
    uniform = math.log(len(tok))  # ~7.6 nats: what the random init scores
    assert ce / count < uniform - 1.5  # ~5.4 after pretraining
    # after a user turn, the next token is most likely <|assistant|>
    ids = tok.apply_chat_template(CHAT[:2], tokenize=True, return_dict=True)["input_ids"][:-1]  # no <|endoftext|>
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert int(logits.argmax()) == tok.convert_tokens_to_ids("<|assistant|>")


def test_tiny_loads_like_a_hub_phi3(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert isinstance(model, Phi3ForCausalLM)
    n_params = sum(p.numel() for p in model.parameters())
    assert 5e5 < n_params < 1e7
    assert model.config.max_position_embeddings >= 1024
    assert json.loads((tiny_model_dir / "tokenizer_config.json").read_text())["chat_template"] == PHI3_CHAT_TEMPLATE

    vocab = tok.get_vocab()
    for special in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert ids == [vocab[special]], special  # one token each, never split
    end, eot = vocab["<|end|>"], vocab["<|endoftext|>"]
    # every id the config names must exist in the embedding table
    for tid in (model.config.pad_token_id, model.config.bos_token_id, *model.config.eos_token_id):
        assert 0 <= tid < model.config.vocab_size
    assert model.config.pad_token_id == tok.pad_token_id == eot
    assert end in model.generation_config.eos_token_id and eot in model.generation_config.eos_token_id
    assert len(tok) <= model.config.vocab_size

    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    assert text == (
        "<|system|>\nYou are a support assistant.<|end|>\n<|user|>\nHow do I reset my password?<|end|>\n"
        "<|assistant|>\nOpen Settings, then choose Reset password.<|end|>\n<|endoftext|>"
    )
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    # byte-level BPE round-trips any text, emoji and accents included
    sample = "Café ☕ costs 4,50 € — ok? 🎉\n\tdone"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample


def test_ensure_tiny_phi3_is_cached_and_race_safe(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("PHITUNE_CACHE", str(tmp_path))
    builds = []

    def fake_build(target):  # the publishing logic under test, without two 35 s pretraining runs
        builds.append(target)
        time.sleep(0.5)  # both threads are building at once
        shutil.copytree(tiny_model_dir, target, dirs_exist_ok=True)
        return target

    monkeypatch.setattr(tiny, "build_tiny_phi3", fake_build)
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_tiny_phi3())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(builds) == 2 and builds[0] != builds[1]  # each into its own temporary folder
    assert results[0] == results[1] == tmp_path / TINY_VERSION
    # no temporary build folders left behind, and a second call reuses the cache
    assert [p.name for p in tmp_path.iterdir()] == [TINY_VERSION]
    stamp = (results[0] / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_phi3() == results[0]
    assert (results[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(builds) == 2


# --- sources and configs ------------------------------------------------------------


def test_resolve_model_source_precedence(tmp_path, tiny_model_dir):
    base = OmegaConf.structured(ModelConfig(name="m"))
    with pytest.raises(PhituneError, match="no source"):
        loader.resolve_model_source(base)
    assert loader.resolve_model_source(OmegaConf.merge(base, {"hub_id": "org/model"})) == "org/model"
    builtin = OmegaConf.merge(base, {"hub_id": "org/model", "builtin": "tiny-phi3"})
    assert loader.resolve_model_source(builtin) == str(tiny_model_dir)
    with_path = OmegaConf.merge(builtin, {"path": str(tiny_model_dir)})
    assert loader.resolve_model_source(with_path) == str(tiny_model_dir.resolve())
    with pytest.raises(PhituneError, match="no such folder"):
        loader.resolve_model_source(OmegaConf.merge(base, {"path": str(tmp_path / "missing")}))
    with pytest.raises(PhituneError, match="no config.json"):
        loader.resolve_model_source(OmegaConf.merge(base, {"path": str(tmp_path)}))
    with pytest.raises(PhituneError, match="unknown built-in"):
        loader.resolve_model_source(OmegaConf.merge(base, {"builtin": "gpt-7"}))


@pytest.mark.parametrize(
    "name, hub_id, context",
    [
        ("phi3-mini-4k", "microsoft/Phi-3-mini-4k-instruct", 4096),
        ("phi3-mini-128k", "microsoft/Phi-3-mini-128k-instruct", 131072),
        ("phi3.5-mini", "microsoft/Phi-3.5-mini-instruct", 131072),
    ],
)
def test_real_model_configs_compose(repo_root, name, hub_id, context):
    cfg = compose(repo_root, [f"model={name}"])
    assert cfg.model.name == name and cfg.model.hub_id == hub_id and cfg.model.context_length == context
    assert cfg.model.builtin is None and cfg.model.path is None
    assert cfg.model.torch_dtype == "auto"
    assert list(cfg.model.lora_target_modules) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert 1e-6 <= cfg.model.base_learning_rate <= 1e-3 and cfg.model.base_batch_size >= 1
    assert loader.resolve_model_source(cfg.model) == hub_id
    assert (repo_root / f"conf/model/{name}.yaml").read_text().startswith(f"# python train.py model={name}")


def test_model_path_override_loads_through_the_hub_code_path(repo_root, tmp_path, tiny_model_dir):
    """model=phi3-mini-4k model.path=DIR: a local save_pretrained copy instead of a download."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = tmp_path / "my-phi3"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(local)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(local)
    cfg = compose(repo_root, ["model=phi3-mini-4k", f"model.path={local}"])
    assert loader.resolve_model_source(cfg.model) == str(local.resolve())
    model = loader.load_model(cfg.model)
    tok = loader.load_tokenizer(cfg.model)
    assert model.dtype == torch.float32  # "auto" on a CPU
    assert model.config.use_cache is False
    assert tok.apply_chat_template(CHAT, tokenize=False).startswith("<|system|>\nYou are")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name
    ref = loader.base_reference(cfg.model)
    assert ref["path"] == str(local.resolve()) and ref["hub_id"] == "microsoft/Phi-3-mini-4k-instruct"


def test_load_tokenizer_requires_a_chat_template_and_sets_padding(tmp_path, tiny_model_dir, tiny_model_cfg):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, folder)
    config_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(config_file.read_text())
    tok_cfg.pop("pad_token")
    config_file.write_text(json.dumps(tok_cfg))
    tok = loader.load_tokenizer(OmegaConf.merge(tiny_model_cfg, {"path": str(folder)}))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "right"

    tok_cfg.pop("chat_template")
    config_file.write_text(json.dumps(tok_cfg))
    with pytest.raises(PhituneError, match="no chat template"):
        loader.load_tokenizer(OmegaConf.merge(tiny_model_cfg, {"path": str(folder)}))


def test_load_model_dtype_and_attention(tiny_model_cfg):
    model = loader.load_model(OmegaConf.merge(tiny_model_cfg, {"torch_dtype": "bfloat16", "attn_implementation": "eager"}))
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert model.config.use_cache is False
    assert loader.load_model(tiny_model_cfg, dtype=torch.float16).dtype == torch.float16
    assert loader.resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(PhituneError, match="torch_dtype"):
        loader.resolve_dtype("float8", "cpu")


# --- training methods ---------------------------------------------------------------


def _train_steps(model, batch, steps: int = 3, lr: float = 1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_lora_changes_the_adapter_and_not_the_base(tiny_model_cfg, tiny_tokenizer):
    model = loader.apply_training_method(
        loader.load_model(tiny_model_cfg), train_cfg("lora", rank=4, alpha=8, dropout=0.0), tiny_model_cfg
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = {n for n in before if "lora_A" in n or "lora_B" in n}
    # 4 target module types x 4 layers x (A, B)
    assert len(lora) == 4 * model.config.num_hidden_layers * 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora
    assert all(torch.count_nonzero(before[n]) == 0 for n in lora if "lora_B" in n)

    _train_steps(model, packed_batch(tiny_tokenizer))
    after = dict(model.named_parameters())
    for name in lora:
        assert not torch.equal(after[name], before[name]), f"{name} did not change"
    for name in set(before) - lora:
        assert torch.equal(after[name], before[name]), f"base weight {name} changed"


def test_full_fine_tuning_changes_the_base(tiny_model_cfg, tiny_tokenizer):
    model = loader.apply_training_method(loader.load_model(tiny_model_cfg), train_cfg("full"), tiny_model_cfg)
    assert all(p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model, packed_batch(tiny_tokenizer))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.self_attn.qkv_proj.weight" in changed
    assert "lm_head.weight" in changed


def test_training_method_errors(tiny_model_cfg):
    model = loader.load_model(tiny_model_cfg)
    with pytest.raises(PhituneError, match="expected lora or full"):
        loader.apply_training_method(model, train_cfg("qlora"), tiny_model_cfg)
    with pytest.raises(PhituneError, match="not in Phi3ForCausalLM"):
        loader.apply_training_method(model, train_cfg("lora", target_modules=["q_proj", "v_proj"]), tiny_model_cfg)


def test_lora_all_linear_shorthand(tiny_model_cfg):
    model = loader.apply_training_method(
        loader.load_model(tiny_model_cfg), train_cfg("lora", target_modules=["all-linear"]), tiny_model_cfg
    )
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # not lm_head


def test_lora_adapter_round_trips_through_load_for_inference(tmp_path, tiny_model_cfg, tiny_tokenizer):
    model = loader.apply_training_method(
        loader.load_model(tiny_model_cfg), train_cfg("lora", rank=4, alpha=8, dropout=0.0), tiny_model_cfg
    )
    batch = packed_batch(tiny_tokenizer)
    _train_steps(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    ref = json.loads(json.dumps(loader.base_reference(tiny_model_cfg)))  # as stored with the run
    assert ref["builtin"] == "tiny-phi3" and ref["context_length"] == tiny_model_cfg.context_length

    reloaded, tok = loader.load_for_inference(ref, str(tmp_path / "adapter"))
    assert not reloaded.training and reloaded.config.use_cache is True
    assert tok.chat_template == tiny_tokenizer.chat_template
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        got = reloaded(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        base = loader.load_model(tiny_model_cfg)(input_ids=batch["input_ids"], use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4)  # the adapter is really applied

    with pytest.raises(PhituneError, match="does not exist"):
        loader.load_for_inference(ref, str(tmp_path / "nope"))


# --- generation ---------------------------------------------------------------------

REPLY = "Open Settings, then choose Reset password."


@pytest.fixture(scope="module")
def parrot(tiny_model_cfg, tiny_tokenizer):
    """The tiny model fully fine-tuned to answer CHAT[:2] with REPLY, then <|end|>."""
    torch.manual_seed(0)
    model = loader.apply_training_method(loader.load_model(tiny_model_cfg), train_cfg("full"), tiny_model_cfg)
    batch = pack([encode_example(tiny_tokenizer, CHAT, 256)])
    _train_steps(model, batch, steps=40, lr=5e-3)  # ~1 s: loss < 0.1 after 30 steps
    model.eval()
    return ChatGenerator(model, tiny_tokenizer, context_length=256)


def test_generate_greedy_stops_at_end_of_turn(parrot):
    out = parrot.generate(CHAT[:2], max_tokens=64, temperature=0)
    assert out["text"] == REPLY
    assert out["finish_reason"] == "stop"
    assert out["prompt_tokens"] == len(parrot.prompt_ids(CHAT[:2]))
    # every reply token plus the <|end|> that stopped it
    assert out["completion_tokens"] == len(parrot.tokenizer(REPLY, add_special_tokens=False)["input_ids"]) + 1


def test_generate_length_and_stop_strings(parrot):
    short = parrot.generate(CHAT[:2], max_tokens=2, temperature=0)
    assert short["finish_reason"] == "length" and short["completion_tokens"] == 2
    assert REPLY.startswith(short["text"]) and 0 < len(short["text"]) < len(REPLY)

    cut = parrot.generate(CHAT[:2], max_tokens=64, temperature=0, stop=["choose", "zzz"])
    assert cut == {**cut, "text": "Open Settings, then ", "finish_reason": "stop"}


def test_stream_matches_generate(parrot):
    deltas = list(parrot.stream(CHAT[:2], max_tokens=64, temperature=0, stop=["Reset"]))
    assert len(deltas) > 1 and all(deltas)
    assert "".join(deltas) == "Open Settings, then choose "
    assert parrot.last_finish_reason == "stop"
    assert parrot.last_result == parrot.generate(CHAT[:2], max_tokens=64, temperature=0, stop=["Reset"])


def test_sampling_is_seeded(parrot):
    msgs = [{"role": "user", "content": "Tell me something."}]
    a = parrot.generate(msgs, max_tokens=12, temperature=1.5, seed=7)
    b = parrot.generate(msgs, max_tokens=12, temperature=1.5, seed=7)
    c = parrot.generate(msgs, max_tokens=12, temperature=1.5, seed=8)
    assert a == b and a["text"] != c["text"]
    # top_p near 0 keeps only the most likely token: the same as greedy
    assert parrot.generate(CHAT[:2], max_tokens=64, top_p=1e-6, seed=1)["text"] == REPLY


def test_generation_errors(parrot):
    tight = ChatGenerator(parrot.model, parrot.tokenizer, context_length=8)
    with pytest.raises(PhituneError, match="context is 8 tokens"):
        tight.generate(CHAT[:2])
    with pytest.raises(PhituneError, match="context is 8 tokens"):
        tight.stream(CHAT[:2])  # raised when the stream is created, before iteration
    with pytest.raises(PhituneError, match="max_tokens"):
        parrot.generate(CHAT[:2], max_tokens=0)
    with pytest.raises(PhituneError, match="top_p"):
        parrot.generate(CHAT[:2], top_p=0)
    # the context bounds the reply: prompt + completion never exceed it
    n_prompt = len(parrot.prompt_ids(CHAT[:2]))
    edge = ChatGenerator(parrot.model, parrot.tokenizer, context_length=n_prompt + 3)
    out = edge.generate(CHAT[:2], max_tokens=50, temperature=0)
    assert out["finish_reason"] == "length" and out["completion_tokens"] == 3


def test_generation_stops_at_an_emitted_turn_marker(tiny_model_cfg, tiny_tokenizer):
    """A model that writes `<|user|>` after its reply (as a badly trained one may) stops
    there, instead of dropping the marker and inventing the user's next turn."""
    from phitune.chat import IGNORE_INDEX, Encoded, generation_prompt_ids

    torch.manual_seed(0)
    model = loader.apply_training_method(loader.load_model(tiny_model_cfg), train_cfg("full"), tiny_model_cfg)
    prompt = generation_prompt_ids(tiny_tokenizer, CHAT[:2])
    reply = tiny_tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    turn = [tiny_tokenizer.convert_tokens_to_ids("<|user|>")] + tiny_tokenizer("\nThanks!", add_special_tokens=False)["input_ids"]
    target = reply + turn
    _train_steps(model, pack([Encoded(prompt + target, [IGNORE_INDEX] * len(prompt) + target)]), steps=40, lr=5e-3)
    gen = ChatGenerator(model, tiny_tokenizer, context_length=256)
    out = gen.generate(CHAT[:2], max_tokens=32, temperature=0)
    assert out == {**out, "text": REPLY, "finish_reason": "stop", "completion_tokens": len(reply) + 1}
