"""The chat format: how a conversation becomes token ids, in one place.

Training, evaluation, generation, serving, `phitune data validate` and
`phitune data inspect` all go through `tokenize_chat`, so the ids a model is trained
on are the ids it is prompted with.

Content is text. Hugging Face fast tokenizers split added special tokens out of any
string, so a user typing `<|end|><|assistant|>` would get the real control ids and
could forge a turn (and, inside assistant content, train the model to emit fake
turns). OpenAI and Azure treat such text as plain text, and so does phitune: only the
chat template's own markers are special tokens. How:

1. render the conversation once with the tokenizer's chat template and tokenize the
   whole text once with offsets (so ordinary conversations get exactly the ids of
   `apply_chat_template(tokenize=True)`);
2. for each message whose content contains a control token's text, locate the
   content's character span (render again with a sentinel in its place) and
   re-tokenize the tokens covering that span with `split_special_tokens=True`.

Labels (what the loss is computed on). Phi-3's chat template has no
`{% generation %}` markers, so transformers' `return_assistant_tokens_mask` is all
zeros for it. Instead, for each trained assistant turn i, messages[:i] rendered with
add_generation_prompt=True must be a prefix of the full render, and the content
follows it verbatim: that gives the turn's span. Tokens starting inside it are
labelled, plus the end-of-turn token right after it (`<|end|>` for Phi-3), so the
model learns to stop.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from phitune.errors import PhituneError

IGNORE_INDEX = -100  # label value that CrossEntropyLoss skips
# Tokens that close a turn in common chat templates; whichever exist in a tokenizer
# (plus its eos) end an assistant turn, in labels and in generation.
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")
# After an assistant's content, look this many tokens ahead for the end-of-turn
# token (Phi-3: it is the very next one; others may put a space or newline first).
_MAX_CLOSING_TOKENS = 3
# Stands in for one message's content to find where the template puts it: private-use
# code points, which no template rewrites and no real content contains.
_SENTINEL = "\ue000phitune-content\ue001"


@dataclass(frozen=True)
class ChatTokens:
    """The control tokens of one tokenizer."""

    special_ids: frozenset  # every special token: the template's markers, bos/eos/unk/pad
    end_of_turn_ids: frozenset  # the subset that closes a turn (eos included)
    control_strings: tuple  # the special tokens' text, longest first

    def found_in(self, text: str) -> list[str]:
        """Control tokens whose text occurs in `text`, in order of first occurrence."""
        return sorted((s for s in self.control_strings if s in text), key=text.index)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chat_tokens(tokenizer) -> ChatTokens:
    """The tokenizer's control tokens, cached: get_vocab() copies the whole vocabulary
    (~40 ms for Phi-3's 32k tokens), too slow to repeat per example."""
    try:
        return _CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
             if getattr(t, "special", False)}
    special = dict(added)
    for i, s in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens):
        special.setdefault(int(i), s)
    vocab = tokenizer.get_vocab()
    stop = {int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        stop.add(int(tokenizer.eos_token_id))
    tokens = ChatTokens(frozenset(special), frozenset(stop),
                        tuple(sorted({s for s in special.values() if s}, key=len, reverse=True)))
    try:
        _CACHE[tokenizer] = tokens
    except TypeError:  # not weak-referenceable: just don't cache
        pass
    return tokens


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    # `weight` is phitune's (and OpenAI's) training switch, not something a chat
    # template should see; other keys (name, ...) pass through.
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:  # e.g. templates that `raise_exception` on role order
        raise PhituneError(f"the chat template rejects this conversation: {exc}") from exc
    if not isinstance(text, str):  # some versions return a list for batched input
        raise PhituneError("chat template rendering did not return a string")
    return text


@dataclass
class Tokenized:
    text: str  # the chat template's rendering
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in `text`


def _offsets_tokenize(tokenizer, text: str, as_text: bool) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
    except NotImplementedError as exc:  # slow (python) tokenizers have no offsets
        raise PhituneError("phitune needs a fast (tokenizers-backed) tokenizer to place labels") from exc
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _content_span(tokenizer, msgs: list[dict], i: int, text: str, add_generation_prompt: bool) -> tuple[int, int]:
    """Character span of message i's content in `text` (the full render)."""
    content = msgs[i]["content"]
    probe = [dict(m, content=_SENTINEL) if j == i else m for j, m in enumerate(msgs)]
    start = render(tokenizer, probe, add_generation_prompt).find(_SENTINEL)
    for piece in (content, content.strip()):  # templates that `| trim`
        if start >= 0 and piece and text.startswith(piece, start):
            return start, start + len(piece)
    raise PhituneError(f"message {i + 1}: the chat template changes this message's text; "
                       "phitune cannot tell which tokens are its content")


def _as_text(tokenizer, tok: Tokenized, span: tuple[int, int], special_ids: frozenset) -> None:
    """Re-tokenize, in place, the tokens that cover `span` with control tokens read as text.

    The slice is tokenized together with its left context back to the previous special
    token, whose tokens are then dropped: a SentencePiece-style tokenizer (Phi-3's:
    Metaspace, `prepend_scheme="first"`) prefixes `▁` to the start of what it is given,
    and would otherwise add a space that the conversation does not have.
    """
    s, e = span
    covering = [j for j, (a, b) in enumerate(tok.offsets) if b > s and a < e]
    if not covering or not any(tok.input_ids[j] in special_ids for j in covering):
        return
    j0, j1 = covering[0], covering[-1] + 1
    a, b = tok.offsets[j0][0], tok.offsets[j1 - 1][1]
    left = next((tok.offsets[j][1] for j in range(j0 - 1, -1, -1) if tok.input_ids[j] in special_ids), 0)
    ids, offsets = _offsets_tokenize(tokenizer, tok.text[left:b], as_text=True)
    keep = [k for k, (x, _) in enumerate(offsets) if x + left >= a]
    if not keep or offsets[keep[0]][0] + left != a or keep[0] == 0 and left < a:  # boundaries moved: slice alone
        ids, offsets, left = *_offsets_tokenize(tokenizer, tok.text[a:b], as_text=True), a
        keep = list(range(len(ids)))
    tok.input_ids[j0:j1] = [ids[k] for k in keep]
    tok.offsets[j0:j1] = [(offsets[k][0] + left, offsets[k][1] + left) for k in keep]


def tokenize_chat(tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> Tokenized:
    """Token ids of the chat-template rendering, message content always read as text."""
    msgs = template_messages(messages)
    text = render(tokenizer, msgs, add_generation_prompt)
    ids, offsets = _offsets_tokenize(tokenizer, text, as_text=False)
    tok = Tokenized(text, ids, offsets)
    ct = chat_tokens(tokenizer)
    spans = [_content_span(tokenizer, msgs, i, text, add_generation_prompt)
             for i, m in enumerate(msgs) if isinstance(m.get("content"), str) and ct.found_in(m["content"])]
    for span in sorted(spans, reverse=True):  # right to left: earlier token indices stay valid
        _as_text(tokenizer, tok, span, ct.special_ids)
    return tok


def generation_prompt_ids(tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """What a model is prompted with to answer `messages` (serving, evaluation, chat)."""
    return tokenize_chat(tokenizer, messages, add_generation_prompt=True).input_ids


def split_conversation(messages: Sequence[dict]) -> Optional[tuple]:
    """(prompt messages, reference text): everything before the last assistant turn, and
    that turn's content. None when there is no assistant turn or nothing before it."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if not last:  # None, or an assistant turn with nothing to answer
        return None
    return template_messages(messages[:last]), str(messages[last].get("content") or "")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX (-100) where no loss is computed

    def __len__(self) -> int:
        return len(self.input_ids)


def _is_trained(message: Mapping[str, Any]) -> bool:
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def _assistant_spans(tokenizer, messages: list[dict], full: str, trained: list[bool]) -> list[tuple[int, int]]:
    """Character spans [start, end) of each trained assistant message's content in `full`."""
    spans = []
    for i, msg in enumerate(messages):
        if not trained[i]:
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
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


def _labels(tokenizer, tok: Tokenized, spans: list[tuple[int, int]]) -> list[int]:
    ids, offsets = tok.input_ids, tok.offsets
    labels = [IGNORE_INDEX] * len(ids)
    ct = chat_tokens(tokenizer)
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
            if ids[k] in ct.end_of_turn_ids:
                for j in range(t, k + 1):
                    labels[j] = ids[j]
                t = k + 1
                break
            if ids[k] in ct.special_ids:
                break  # the next turn's marker: this template closes turns without a stop token
    return labels


def encode_example(tokenizer, messages: Sequence[Mapping[str, Any]], max_len: int) -> Encoded:
    """Token ids of the chat-template rendering, labels on assistant content + end-of-turn token.

    Non-assistant tokens (system, user, role markers) and assistant messages with
    `"weight": 0` get IGNORE_INDEX. Truncated to the first `max_len` tokens.
    """
    tok = tokenize_chat(tokenizer, messages)
    trained = [_is_trained(m) for m in messages]
    spans = _assistant_spans(tokenizer, template_messages(messages), tok.text, trained) if any(trained) else []
    labels = _labels(tokenizer, tok, spans)
    return Encoded(input_ids=tok.input_ids[:max_len], labels=labels[:max_len])


def count_tokens(tokenizer, messages: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(total tokens, trained tokens) of a conversation, without truncation."""
    enc = encode_example(tokenizer, messages, max_len=2**62)
    return len(enc.input_ids), sum(1 for label in enc.labels if label != IGNORE_INDEX)


class EncodeOnce:
    """count_tokens for validation, then encode_example for training, tokenising each conversation once.

    A run validates every file (token counts need the full encoding) before it
    loads and encodes the examples; the validator and the loader parse the same
    JSON lines into separate objects, so the encoding is kept under the
    conversation's JSON text. encode_example(max_len) is the full encoding cut at
    max_len, so the kept encoding is exactly what encode_example would return.
    """

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len
        self._kept: dict[str, Encoded] = {}

    @staticmethod
    def _key(messages) -> str:
        return json.dumps(messages, sort_keys=True, ensure_ascii=False)

    def count(self, messages: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
        enc = encode_example(self.tokenizer, messages, max_len=2**62)
        self._kept[self._key(messages)] = Encoded(enc.input_ids[:self.max_len], enc.labels[:self.max_len])
        return len(enc.input_ids), sum(1 for label in enc.labels if label != IGNORE_INDEX)

    def encode(self, messages: Sequence[Mapping[str, Any]]) -> Encoded:
        kept = self._kept.pop(self._key(messages), None)  # popped: a duplicate line is encoded afresh
        return kept if kept is not None else encode_example(self.tokenizer, messages, self.max_len)

    def forget(self) -> None:
        self._kept.clear()
