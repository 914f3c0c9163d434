"""What training and serving make of one conversation, token by token.

`phitune data inspect` prints this (what axolotl's `preprocess --debug` shows): the
rendered text, each token with its id and whether it carries loss, and the prompt a
server builds for the conversation up to its last assistant turn. It calls the same
phitune.chat functions that training and serving call, so what it shows is what runs.
"""
from __future__ import annotations

from typing import Sequence

from phitune.chat import IGNORE_INDEX, chat_tokens, encode_example, generation_prompt_ids, split_conversation, tokenize_chat


def inspect_conversation(tokenizer, messages: Sequence[dict], max_len: int) -> dict:
    """{text, input_ids, tokens, labels, truncated_from, generation_prompt_ids, generation_prompt,
    control_text}; labels are -100 where no loss is computed."""
    full = tokenize_chat(tokenizer, messages)
    enc = encode_example(tokenizer, messages, max_len)
    pair = split_conversation(messages)
    prompt_ids = generation_prompt_ids(tokenizer, pair[0]) if pair else None
    ct = chat_tokens(tokenizer)
    return {
        "text": full.text,
        "input_ids": enc.input_ids,
        "tokens": [tokenizer.decode([i]) for i in enc.input_ids],
        "labels": enc.labels,
        "truncated_from": len(full.input_ids) if len(full.input_ids) > max_len else None,
        "generation_prompt_ids": prompt_ids,
        "generation_prompt": tokenizer.decode(prompt_ids) if prompt_ids is not None else None,
        # control-token text inside content, tokenised as characters (never as the marker)
        "control_text": list(dict.fromkeys(t for m in messages for t in ct.found_in(str(m.get("content") or "")))),
    }


def format_text(where: str, info: dict) -> str:
    n_loss = sum(1 for label in info["labels"] if label != IGNORE_INDEX)
    lines = [f"{where}: {len(info['input_ids'])} tokens, {n_loss} with loss"
             + (f" (truncated from {info['truncated_from']})" if info["truncated_from"] else "")]
    if info["control_text"]:
        lines.append("control-token text in content, tokenised as plain text: " + ", ".join(info["control_text"]))
    lines += ["", "rendered:", info["text"], "", "  #     id  loss  token"]
    for k, (i, tok, label) in enumerate(zip(info["input_ids"], info["tokens"], info["labels"])):
        lines.append(f"{k:>3} {i:>6}  {'yes ' if label != IGNORE_INDEX else '  - '}  {tok!r}")
    prompt = info["generation_prompt_ids"]
    lines.append("")
    if prompt is None:
        lines.append("generation prompt: none (no assistant turn with a conversation before it)")
    else:
        prefix = info["input_ids"][:len(prompt)] == prompt
        lines += [f"generation prompt (what serving sends for the turns before the last assistant turn): "
                  f"{len(prompt)} tokens, {'a' if prefix else 'NOT a'} prefix of the training ids",
                  info["generation_prompt"]]
    return "\n".join(lines)
