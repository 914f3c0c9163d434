"""Chat messages -> token ids + labels, with loss only on what the assistant says.

Phi-3's chat template has no `{% generation %}` markers, so transformers'
`return_assistant_tokens_mask` is all zeros for it. Instead:

1. render the whole conversation once with the tokenizer's chat template;
2. for each assistant turn i, render messages[:i] with add_generation_prompt=True:
   that text must be a prefix of the full render, and the assistant's content
   must follow it verbatim; this gives the turn's character span;
3. tokenize the full render once with offsets and label the tokens inside the
   span, plus the end-of-turn token right after it (`<|end|>` for Phi-3), so the
   model learns to stop.

Tokenizing the full render once (not piece by piece) keeps the ids exactly those
that `apply_chat_template(tokenize=True)` and generation see.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from phitune.errors import PhituneError

IGNORE_INDEX = -100  # label value that CrossEntropyLoss skips
# Tokens that close a turn in common chat templates; whichever exist in a tokenizer
# (plus its eos) count as "end of the assistant turn".
_END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")
# After an assistant's content, look this many tokens ahead for the end-of-turn
# token (Phi-3: it is the very next one; others may put a space or newline first).
_MAX_CLOSING_TOKENS = 3


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX (-100) where no loss is computed

    def __len__(self) -> int:
        return len(self.input_ids)


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    # `weight` is phitune's (and OpenAI's) training switch, not something a chat
    # template should see; other keys (name, ...) pass through.
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:  # e.g. templates that `raise_exception` on role order
        raise PhituneError(f"the chat template rejects this conversation: {exc}") from exc
    if not isinstance(text, str):  # some versions return a list for batched input
        raise PhituneError("chat template rendering did not return a string")
    return text


_TOKEN_SETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_sets(tokenizer) -> tuple[set[int], set[int]]:
    """(end-of-turn ids, special ids) of a tokenizer, cached: get_vocab() copies the
    whole vocabulary (~40 ms for Phi-3's 32k tokens), too slow to repeat per example."""
    try:
        return _TOKEN_SETS[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab()
    stop = {int(vocab[t]) for t in _END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        stop.add(int(tokenizer.eos_token_id))
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    try:
        _TOKEN_SETS[tokenizer] = (stop, special)
    except TypeError:  # not weak-referenceable: just don't cache
        pass
    return stop, special


def _is_trained(message: Mapping[str, Any]) -> bool:
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def _assistant_spans(tokenizer, messages: list[dict], full: str, trained: list[bool]) -> list[tuple[int, int]]:
    """Character spans [start, end) of each trained assistant message's content in `full`."""
    spans = []
    for i, msg in enumerate(messages):
        if not trained[i]:
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        content = msg.get("content") or ""
        if not isinstance(content, str):
            raise PhituneError(f"message {i + 1}: assistant content must be a string to be trained on")
        start = len(prefix)
        if not full.startswith(prefix):
            raise PhituneError(
                "the chat template renders a conversation differently from its prefix (message "
                f"{i + 1}); phitune cannot tell which tokens the assistant wrote"
            )
        if full.startswith(content, start):
            end = start + len(content)
        elif content.strip() and full.startswith(content.strip(), start):  # templates that `| trim`
            end = start + len(content.strip())
        else:
            raise PhituneError(
                f"message {i + 1}: the chat template changes the assistant's text; "
                "phitune cannot tell which tokens the assistant wrote"
            )
        spans.append((start, end))
    return spans


def encode_example(tokenizer, messages: Sequence[Mapping[str, Any]], max_len: int) -> Encoded:
    """Token ids of the chat-template rendering, labels on assistant content + end-of-turn token.

    Non-assistant tokens (system, user, role markers) and assistant messages with
    `"weight": 0` get IGNORE_INDEX. Truncated to the first `max_len` tokens.
    """
    msgs = _template_messages(messages)
    trained = [_is_trained(m) for m in messages]
    full = _render(tokenizer, msgs, add_generation_prompt=False)
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # slow (python) tokenizers have no offsets
        raise PhituneError("phitune needs a fast (tokenizers-backed) tokenizer to place labels") from exc
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    stop_ids, special_ids = _token_sets(tokenizer)

    spans = _assistant_spans(tokenizer, msgs, full, trained) if any(trained) else []
    t = 0
    for start, end in spans:
        # content tokens: those that start inside the span
        while t < len(ids) and offsets[t][0] < start:
            t += 1
        while t < len(ids) and offsets[t][0] < end:
            labels[t] = ids[t]
            t += 1
        # the end-of-turn token (and anything between it and the content)
        for k in range(t, min(t + _MAX_CLOSING_TOKENS, len(ids))):
            if ids[k] in stop_ids:
                for j in range(t, k + 1):
                    labels[j] = ids[j]
                t = k + 1
                break
            if ids[k] in special_ids:
                break  # the next turn's marker: this template closes turns without a stop token
    return Encoded(input_ids=ids[:max_len], labels=labels[:max_len])


def count_tokens(tokenizer, messages: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(total tokens, trained tokens) of a conversation, without truncation."""
    enc = encode_example(tokenizer, messages, max_len=2**62)
    return len(enc.input_ids), sum(1 for label in enc.labels if label != IGNORE_INDEX)
