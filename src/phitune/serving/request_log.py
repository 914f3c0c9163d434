"""`phitune serve --log-requests FILE`: one chat JSONL line per answered exchange, for the next fine-tune.

    {"messages": [...the request's messages..., {"role": "assistant", "content": ANSWER}],
     "metadata": {"id", "created", "model", "model_version", "model_uri", "finish_reason", "usage", "content"}}

The lines are the chat format `phitune data validate` reads and `data.train_file=`
trains on (validate accepts the "metadata" key; training ignores it). Content is
redacted by default (each text becomes `[redacted: N characters]`, the turn structure,
roles and usage stay): prompts may hold personal data, so keeping them is an explicit
choice (`--log-request-content`). Only answers that finished (stop or length) are
logged: a blocked prompt or completion has no answer to learn from (the metrics count
those), and none with an empty turn. Lines are appended and flushed one at a time, so a reader never sees half a line.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from phitune.errors import PhituneError


def redacted(text: str) -> str:
    return f"[redacted: {len(text)} characters]"


class RequestLog:
    def __init__(self, path, keep_content: bool = False):
        self.path, self.keep_content = Path(path), bool(keep_content)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise PhituneError(f"--log-requests {path}: cannot open it for appending ({exc.strerror or exc})") from None
        self._lock = threading.Lock()

    def write(self, messages: list, answer: str, meta: dict) -> None:
        if not answer.strip() or any(not m["content"].strip() for m in messages):
            return  # an empty turn is not a training line (validate would refuse it)
        turns = [*messages, {"role": "assistant", "content": answer}]
        if not self.keep_content:
            turns = [{**m, "content": redacted(m["content"])} for m in turns]
        line = json.dumps({"messages": turns, "metadata": {"created": int(time.time()), **meta,
                                                            "content": "kept" if self.keep_content else "redacted"}},
                          ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
