"""Chat encoding (labels on assistant turns only) and padding-free packing."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from phitune.chat import IGNORE_INDEX, Encoded, count_tokens, encode_example
from phitune.data.pack import pack, pad, plan_batches
from phitune.errors import PhituneError
from phitune.config import TrainConfig
from phitune.modeling.loader import apply_training_method, load_model

CONVERSATION = [
    {"role": "system", "content": "You help Tasklane customers."},
    {"role": "user", "content": "Where is my invoice?", "name": "dana"},
    {"role": "assistant", "content": "Go to Account > Billing history and download the PDF."},
    {"role": "user", "content": "And last year's?"},
    {"role": "assistant", "content": "Same page: pick the year at the top.", "weight": 0},
    {"role": "user", "content": "Thanks! 🎉"},
    {"role": "assistant", "content": "You're welcome! Café ☕ on us.", "weight": 1},
]


def labelled_runs(tokenizer, enc: Encoded) -> list[str]:
    """Decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for tok_id, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == tok_id  # a label is the token itself (the model shifts)
            current.append(tok_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


# --- encoding -----------------------------------------------------------------------


def test_labels_cover_exactly_the_trained_assistant_turns(tiny_tokenizer):
    enc = encode_example(tiny_tokenizer, CONVERSATION, max_len=1024)
    assert len(enc.input_ids) == len(enc.labels) == len(enc)
    # the ids are exactly what the chat template gives
    text = tiny_tokenizer.apply_chat_template(
        [{k: v for k, v in m.items() if k != "weight"} for m in CONVERSATION], tokenize=False
    )
    assert enc.input_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # turn 1 and 3 are trained (content + the <|end|> closing them); weight 0 is not
    assert labelled_runs(tiny_tokenizer, enc) == [
        "Go to Account > Billing history and download the PDF.<|end|>",
        "You're welcome! Café ☕ on us.<|end|>",
    ]
    vocab = tiny_tokenizer.get_vocab()
    markers = {vocab[t] for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>")}
    assert all(label == IGNORE_INDEX for tok, label in zip(enc.input_ids, enc.labels) if tok in markers)
    assert count_tokens(tiny_tokenizer, CONVERSATION) == (
        len(enc.input_ids),
        sum(label != IGNORE_INDEX for label in enc.labels),
    )


def test_nothing_trained_without_a_weighted_assistant_turn(tiny_tokenizer):
    silent = [m for m in CONVERSATION[:5]]
    silent[2] = {**silent[2], "weight": 0}
    enc = encode_example(tiny_tokenizer, silent, max_len=1024)
    assert set(enc.labels) == {IGNORE_INDEX}
    only_user = encode_example(tiny_tokenizer, CONVERSATION[:2], max_len=1024)
    assert set(only_user.labels) == {IGNORE_INDEX}
    assert count_tokens(tiny_tokenizer, CONVERSATION[:2])[1] == 0


def test_truncation(tiny_tokenizer):
    full = encode_example(tiny_tokenizer, CONVERSATION, max_len=1024)
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = encode_example(tiny_tokenizer, CONVERSATION, max_len=first_label + 3)
    assert cut.input_ids == full.input_ids[: first_label + 3]
    assert cut.labels == full.labels[: first_label + 3]
    assert sum(label != IGNORE_INDEX for label in cut.labels) == 3
    gone = encode_example(tiny_tokenizer, CONVERSATION, max_len=first_label)
    assert len(gone) == first_label and set(gone.labels) == {IGNORE_INDEX}  # truncated away


def test_other_templates_label_content_and_closing_token(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # Llama-2 style: a space, then eos closes the assistant turn; no newline, no <|end|>.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + ' ' + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    enc = encode_example(tok, CONVERSATION[:3], max_len=1024)
    assert labelled_runs(tok, enc) == ["Go to Account > Billing history and download the PDF. <|endoftext|>"]

    # A template that rewrites what the assistant said cannot be labelled: say so.
    tok.chat_template = "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] | upper }}{% endfor %}"
    with pytest.raises(PhituneError, match="changes the assistant's text"):
        encode_example(tok, CONVERSATION[:3], max_len=1024)

    # A template that refuses a conversation: a PhituneError, not a jinja traceback.
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(PhituneError, match="roles must alternate"):
        encode_example(tok, CONVERSATION[:3], max_len=1024)


def test_every_sample_example_has_trainable_tokens(tiny_tokenizer, repo_root):
    path = repo_root / "data" / "support_train.jsonl"
    if not path.is_file():
        pytest.skip("no sample data")
    lines = path.read_text(encoding="utf-8-sig").splitlines()[:40]
    for n, line in enumerate(lines, 1):
        messages = json.loads(line)["messages"]
        enc = encode_example(tiny_tokenizer, messages, max_len=10**6)
        runs = labelled_runs(tiny_tokenizer, enc)
        trained = [m["content"] + "<|end|>" for m in messages if m["role"] == "assistant" and m.get("weight", 1) != 0]
        assert runs == trained, f"line {n}"


# --- packing ------------------------------------------------------------------------


def test_pack_layout():
    a = Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Encoded([8, 9], [8, 9])  # a first token with a label (never trainable): dropped
    out = pack([a, b])
    assert set(out) == {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                        "max_length_k"}
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert all(out[k].dtype == torch.long for k in ("input_ids", "labels", "position_ids"))
    # the sequence boundaries, once per batch, as flash-attn's varlen kernel takes them
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5] and out["cu_seq_lens_q"].dtype == torch.int32
    assert out["cu_seq_lens_k"] is out["cu_seq_lens_q"] and out["max_length_q"] == out["max_length_k"] == 3
    with pytest.raises(ValueError):
        pack([])
    with pytest.raises(ValueError):
        pack([Encoded([], [])])


def test_pad_layout():
    out = pad([Encoded([5, 6, 7], [5, 6, 7]), Encoded([8], [8])], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]


def test_plan_batches_is_a_seeded_partition():
    lengths = [10] * 23
    plan = plan_batches(lengths, 4, seed=42, epoch=0)
    assert [len(g) for g in plan] == [4] * 5 + [3]
    assert sorted(i for g in plan for i in g) == list(range(23))
    assert plan == plan_batches(lengths, 4, seed=42, epoch=0)
    assert plan != plan_batches(lengths, 4, seed=42, epoch=1)
    assert plan != plan_batches(lengths, 4, seed=43, epoch=0)
    assert plan_batches([], 4, seed=0, epoch=0) == []


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    convs = [
        CONVERSATION,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        CONVERSATION[1:3],
        [{"role": "user", "content": "One word?"}, {"role": "assistant", "content": "Yes."}],
    ]
    encs = [encode_example(tiny_tokenizer, c, max_len=512) for c in convs]
    assert len({len(e) for e in encs}) == len(encs)  # different lengths: padding matters
    return encs


@pytest.mark.parametrize("attn, lora", [("sdpa", False), ("eager", False), ("sdpa", True),
                                        ("packed_sdpa", False), ("packed_sdpa", True)])
def test_packed_batch_matches_padded_batch(tiny_model_cfg, tiny_tokenizer, examples, attn, lora):
    """Same loss and same per-example logits: packing neither leaks nor drops context."""
    cfg = OmegaConf.merge(tiny_model_cfg, {"attn_implementation": attn, "torch_dtype": "float32"})
    model = load_model(cfg)
    if lora:  # the peft wrapper must hand position_ids through to the model
        train = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"lora": {"rank": 4, "dropout": 0.0}})
        model = apply_training_method(model, train, cfg)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at 0 (a no-op adapter): make it matter
                torch.nn.init.normal_(p, std=0.05)
    model.eval()
    packed, padded = pack(examples), pad(examples, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        out_packed = model(**packed, use_cache=False)
        logits_padded = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
        ).logits

    # padded loss, token-weighted over the whole batch: sum of per-token CE / labelled tokens
    shift_logits = logits_padded[:, :-1].reshape(-1, logits_padded.shape[-1])
    shift_labels = padded["labels"][:, 1:].reshape(-1)
    ce_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss_padded = ce_sum / (shift_labels != IGNORE_INDEX).sum()
    assert abs(out_packed.loss.item() - loss_padded.item()) < 1e-4

    start = 0
    for row, ex in enumerate(examples):
        n = len(ex)
        torch.testing.assert_close(
            out_packed.logits[0, start:start + n], logits_padded[row, :n], rtol=1e-4, atol=1e-4
        )
        start += n

    # the check can fail: without position_ids the row is one long sequence
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False)
    assert abs(leaky.loss.item() - loss_padded.item()) > 1e-3
