"""Screen training data with the content filter, as Azure screens data before it fine-tunes.

    phitune data validate FILE --safety          # lists FILE:LINE: category severity
    python train.py data.safety_check=true       # refuses flagged data ...
    python train.py data.safety_check=true data.allow_flagged=true   # ... unless allowed

Every message of an example (system, user and assistant) is screened with the
prompt-side filter settings; an example is flagged in each category that the
filter would block, at the worst severity among its messages.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable

from phitune.errors import DataError
from phitune.safety.filter import CATEGORIES, SEVERITY_VALUE, ContentFilter, build_filter, load_safety_config

MAX_LISTED = 50  # flags listed in a training run's error; `phitune data validate --safety` lists all


@dataclass(frozen=True)
class Flag:
    path: str
    line: int
    category: str
    severity: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.category} {self.severity}"


def data_filter(safety_config: str | None = None) -> ContentFilter:
    """The filter that screens data: the prompt-side settings of a safety config (defaults: local, medium)."""
    return build_filter(load_safety_config(safety_config), "prompt")


def screen_messages(content_filter: ContentFilter, messages: list) -> dict:
    """{category: worst severity} over the categories the filter blocks in any message."""
    worst: dict = {}
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            continue
        result = content_filter.check(content)
        if result.error and not result.filtered_categories:
            raise DataError(f"cannot screen the data: {result.error}")
        for cat, sev in result.flagged():
            if cat not in worst or SEVERITY_VALUE[sev] > SEVERITY_VALUE[worst[cat]]:
                worst[cat] = sev
    return {c: worst[c] for c in CATEGORIES if c in worst}


def screen_items(content_filter: ContentFilter, items: Iterable) -> list:
    """Flags for (path, line, messages) triples."""
    flags = []
    for path, line, messages in items:
        for cat, sev in screen_messages(content_filter, messages).items():
            flags.append(Flag(str(path), int(line), cat, sev))
    return flags


def screen_file(path, content_filter: ContentFilter | None = None) -> list:
    """Flags for the valid examples of a chat JSONL file (invalid lines are validation's business)."""
    from phitune.data.validate import iter_valid_examples

    content_filter = content_filter or data_filter()
    return screen_items(content_filter, ((path, line, messages) for line, messages in iter_valid_examples(path)))


def print_file_screen(path, safety_config: str | None = None, out=None) -> int:
    """`phitune data validate FILE --safety`: print each flag, return how many examples are flagged."""
    out = out or sys.stdout
    flags = screen_file(path, data_filter(safety_config))
    for flag in flags:
        print(flag, file=out)
    examples = len({f.line for f in flags})
    if flags:
        print(f"{path}: {examples} example(s) flagged by the content filter; a training run with "
              "data.safety_check=true refuses them unless data.allow_flagged=true", file=out)
    return examples


def screen_examples(cfg, splits) -> list:
    """The training recipe's hook (data.safety_check=true): raise DataError listing the
    flagged examples unless data.allow_flagged=true, in which case warn and go on."""
    data = cfg.data
    content_filter = data_filter(data.get("safety_config") if hasattr(data, "get") else None)
    examples = list(splits.train) + list(splits.valid or [])
    flags = screen_items(content_filter, ((ex.source, ex.line, ex.messages) for ex in examples))
    if not flags:
        return flags
    listed = "\n".join(str(f) for f in flags[:MAX_LISTED])
    more = f"\n... and {len(flags) - MAX_LISTED} more" if len(flags) > MAX_LISTED else ""
    n = len({(f.path, f.line) for f in flags})
    if data.get("allow_flagged"):
        print(f"{listed}{more}\nwarning: {n} example(s) flagged by the content filter; "
              "training on them because data.allow_flagged=true", file=sys.stderr)
        return flags
    raise DataError(f"the content filter flagged {n} training example(s):\n{listed}{more}\n"
                    "remove them, or set data.allow_flagged=true to train on them anyway")
