"""A run tokenises each conversation once: validation's token counts and training's ids
come from the same encoding, and that encoding is exactly encode_example's."""
from __future__ import annotations

import json

from hydra import compose, initialize_config_dir

import phitune.chat as chat
import phitune.config  # noqa: F401  (registers the structured configs)
from phitune import recipe


def _chat(k: int, words: int = 3) -> dict:
    return {"messages": [{"role": "user", "content": f"question {k}"},
                         {"role": "assistant", "content": " ".join(f"answer{k}" for _ in range(words))}]}


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(repo_root, train, valid, max_len):
    with initialize_config_dir(str(repo_root / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"data.train_file={train}", f"data.validation_file={valid}",
                                            f"data.max_seq_len={max_len}"])


def _counting(monkeypatch) -> list:
    calls = []
    real = chat.tokenize_chat

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(chat, "tokenize_chat", counted)
    return calls


def test_each_example_is_tokenised_once(repo_root, tiny_model_dir, tmp_path, monkeypatch):
    train = _write(tmp_path / "train.jsonl", [_chat(k) for k in range(12)])
    valid = _write(tmp_path / "valid.jsonl", [_chat(100 + k) for k in range(4)])
    cfg = _cfg(repo_root, train, valid, 512)
    calls = _counting(monkeypatch)
    data = recipe._setup_data(cfg)
    assert len(data.train) == 12 and len(data.valid) == 4
    assert len(calls) == 12 + 4  # was 2 x (12 + 4): once to count while validating, once to encode


def test_reused_encodings_equal_encode_example(repo_root, tiny_model_dir, tmp_path):
    # a duplicate line, a validation example that is also in training, and truncation to 24 tokens
    rows = [_chat(0), _chat(1, words=40), _chat(0), _chat(2)]
    train = _write(tmp_path / "train.jsonl", rows)
    valid = _write(tmp_path / "valid.jsonl", [_chat(2), _chat(3, words=40)])
    cfg = _cfg(repo_root, train, valid, 24)
    data = recipe._setup_data(cfg)
    expect = [chat.encode_example(data.tokenizer, r["messages"], 24) for r in rows]
    assert [(e.input_ids, e.labels) for e in data.train] == [(e.input_ids, e.labels) for e in expect]
    assert max(len(e) for e in data.train) == 24  # the long one was cut
    expect_valid = [chat.encode_example(data.tokenizer, m, 24) for m in (_chat(2)["messages"], _chat(3, 40)["messages"])]
    assert [(e.input_ids, e.labels) for e in data.valid] == [(e.input_ids, e.labels) for e in expect_valid]
    # counts for validation are of the untruncated conversation
    enc = chat.EncodeOnce(data.tokenizer, 24)
    assert enc.count(_chat(1, words=40)["messages"]) == chat.count_tokens(data.tokenizer, _chat(1, words=40)["messages"])
