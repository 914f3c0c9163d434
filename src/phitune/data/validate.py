"""Check a chat-completion JSONL file the way Azure AI Foundry and OpenAI do before
they accept it, and report every problem as `FILE:LINE: message`.

One example per line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}

The file is streamed in binary, one line at a time, and each line is decoded here,
so a multi-GB file costs bounded memory: per example we keep a 16-byte hash (to
find duplicates) and, when tokens are counted, one token count (for the p95).

Blank lines are skipped with a warning (OpenAI's upload check rejects them; the
file is still usable here because the trainer skips them too).
"""
from __future__ import annotations

import hashlib
import json
import math
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name", "weight")
# Top-level keys accepted besides "messages", ignored in training: OpenAI's fine-tuning
# keys, and "metadata", where `phitune serve --log-requests` records each exchange's provenance.
EXTRA_TOP_KEYS = ("tools", "functions", "parallel_tool_calls", "metadata")
MIN_EXAMPLES = 10  # Azure AI Foundry refuses a training file with fewer examples
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# Stored Problem objects are capped so a file with millions of bad lines stays
# bounded in memory; the counts stay exact.
DEFAULT_MAX_STORED = 10_000

TokenCounter = Callable[[list], "tuple[int, int]"]  # messages -> (total tokens, assistant tokens)


@dataclass
class Problem:
    path: str
    line: int  # 1-based; 0 = the whole file
    message: str
    level: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        tag = "warning: " if self.level == "warning" else ""
        return f"{where}: {tag}{self.message}"


@dataclass
class ValidationReport:
    path: str
    problems: list = field(default_factory=list)  # Problem, at most max_stored of them
    n_examples: int = 0  # lines that are valid examples
    role_counts: dict = field(default_factory=lambda: {r: 0 for r in ROLES})
    token_stats: Optional[dict] = None  # None when no token counter was given
    n_lines: int = 0
    n_errors: int = 0  # exact, even when problems were capped
    n_warnings: int = 0
    n_blank: int = 0
    n_duplicates: int = 0
    n_without_system: int = 0
    n_control_text: int = 0  # examples whose content contains a control token's text
    context_length: Optional[int] = None
    readable: bool = True
    label_counts: Optional[dict] = None  # classification data: label -> examples (phitune.classify.data)

    @property
    def ok(self) -> bool:
        """True when the file is usable for training: no errors (warnings are fine)."""
        return self.n_errors == 0

    @property
    def errors(self) -> list:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list:
        return [p for p in self.problems if p.level == "warning"]

    def format_summary(self) -> str:
        if not self.readable:
            return f"{self.path}: not usable (cannot read it)"
        rc = self.role_counts
        lines = [
            f"{self.path}: {self.n_examples} examples in {self.n_lines} lines",
            f"  messages: {rc.get('system', 0)} system, {rc.get('user', 0)} user, {rc.get('assistant', 0)} assistant",
        ]
        ts = self.token_stats
        if ts and ts.get("count"):
            lines.append(
                f"  tokens per example (chat template applied): min {ts['min']}, mean {ts['mean']:.1f}, "
                f"p95 {ts['p95']}, max {ts['max']}"
            )
            ctx = f" (examples capped at {self.context_length} tokens)" if self.context_length else ""
            trained = f"assistant (trained) tokens: {ts['assistant']:,}; " if self.label_counts is None else ""
            lines.append(f"  {trained}training tokens per epoch: {ts['train_per_epoch']:,}{ctx}")
            if ts.get("over_context"):
                lines.append(f"  {ts['over_context']} examples are longer than the context and will be truncated")
        elif ts is None:
            lines.append("  tokens: not counted (no tokenizer)")
        if self.label_counts is not None:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self.label_counts.items()))
            lines.append(f"  labels: {len(self.label_counts)} ({counts})")
        if self.n_control_text:
            lines.append(f"  {self.n_control_text} examples contain control-token text (trained as plain text)")
        verdict = "usable" if self.ok else "NOT usable"
        lines.append(f"  {self.n_errors} errors, {self.n_warnings} warnings: {verdict}")
        return "\n".join(lines)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def canonical_json(value: Any) -> str:
    """One spelling per JSON value (sorted keys, no spaces): for hashes and digests."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def check_example(obj: Any) -> "tuple[list[str], list[str]]":
    """Errors and warnings of one parsed line (without the `FILE:LINE:` prefix)."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object per line, got {_json_type(obj)}"], []
    warnings: list[str] = []
    for key in obj:
        if key != "messages" and key not in EXTRA_TOP_KEYS:
            warnings.append(f'unknown top-level key "{key}" (ignored; expected "messages")')
    if "messages" not in obj:
        return ['no "messages" key'], warnings
    return check_messages(obj["messages"]), warnings


def check_messages(messages: Any, require_assistant: bool = True) -> list[str]:
    """Errors of one example's "messages" list; a classified conversation needs no assistant turn."""
    errors: list[str] = []
    if not isinstance(messages, list):
        return [f'"messages" must be a list, got {_json_type(messages)}']
    if not messages:
        return ['"messages" is empty']
    n_assistant = n_trained = 0
    for i, msg in enumerate(messages, start=1):
        where = f"message {i}"
        if not isinstance(msg, dict):
            errors.append(f"{where}: expected an object, got {_json_type(msg)}")
            continue
        for key in msg:
            if key not in MESSAGE_KEYS:
                errors.append(f'{where}: unknown key "{key}" (allowed: {", ".join(MESSAGE_KEYS)})')
        role = msg.get("role")
        if "role" not in msg:
            errors.append(f'{where}: no "role"')
        elif role not in ROLES:
            errors.append(f"{where}: role {json.dumps(role)} is not one of {', '.join(ROLES)}")
        if "content" not in msg:
            errors.append(f'{where}: no "content"')
        else:
            content = msg["content"]
            if not isinstance(content, str):
                errors.append(f"{where}: content must be a string, got {_json_type(content)}")
            elif not content.strip():
                errors.append(f"{where}: content is empty")
        if "name" in msg and not isinstance(msg["name"], str):
            errors.append(f"{where}: name must be a string, got {_json_type(msg['name'])}")
        weight = msg.get("weight", 1)
        if "weight" in msg:
            if isinstance(weight, bool) or weight not in (0, 1):
                errors.append(f"{where}: weight must be 0 or 1, got {json.dumps(weight)}")
                weight = 1
            elif role != "assistant":
                errors.append(f"{where}: weight is only allowed on assistant messages")
        if role == "assistant":
            n_assistant += 1
            n_trained += weight == 1
    if require_assistant and n_assistant == 0:
        errors.append("no assistant message to learn from")
    elif require_assistant and n_trained == 0:
        errors.append("every assistant message has weight 0: nothing to learn from")
    return errors


def _chat_check(obj: Any, lineno: int) -> "tuple[list[str], list[str], Optional[list]]":
    errors, warnings = check_example(obj)
    return errors, warnings, None if errors else obj["messages"]


def _decode(raw: bytes) -> "tuple[str, bool]":
    """Bytes of one line -> (text without the line ending, had a newline). Raises UnicodeDecodeError."""
    had_newline = raw.endswith(b"\n")
    if had_newline:
        raw = raw[:-1]
    if raw.endswith(b"\r"):  # CRLF files
        raw = raw[:-1]
    return raw.decode("utf-8"), had_newline


def _percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def control_token_warnings(messages: list, control_tokens: Sequence[str]) -> list[str]:
    """One warning per message whose content contains a control token's text.

    phitune tokenises content as text (phitune.chat), so such text cannot forge a turn;
    the warning tells the user the model sees it as characters, not as a marker.
    """
    out = []
    for msg in messages:
        content = msg.get("content")
        found = sorted((t for t in control_tokens if t in content), key=content.index) if isinstance(content, str) else []
        if found:
            names = " and ".join(f"'{t}'" for t in found[:3]) + (" ..." if len(found) > 3 else "")
            what = "a control token of this model; it is" if len(found) == 1 else "control tokens of this model; they are"
            out.append(f"{msg['role']} content contains {names}, {what} trained as plain text")
    return out


def validate_file(
    path,
    token_counter: Optional[TokenCounter] = None,
    context_length: Optional[int] = None,
    max_stored: int = DEFAULT_MAX_STORED,
    control_tokens: Sequence[str] = (),
    check: Optional[Callable] = None,
) -> ValidationReport:
    """Validate one chat JSONL file; never raises for bad input (it becomes a Problem).

    control_tokens: the model's special tokens (phitune.chat.chat_tokens); content
    containing their text is warned about, line by line.
    check(obj, lineno) -> (errors, warnings, messages): another task's line format
    (phitune.classify.data); default: chat's {"messages": [...]}, and the chat-only file rules
    (Foundry's minimum count, examples without a system message)."""
    chat = check is None
    check = check or _chat_check
    spath = str(path)
    report = ValidationReport(path=spath, context_length=context_length)

    def add(line: int, message: str, level: str = "error", force: bool = False) -> None:
        if level == "error":
            report.n_errors += 1
        else:
            report.n_warnings += 1
        if force or len(report.problems) < max_stored:
            report.problems.append(Problem(spath, line, message, level))

    seen: dict = {}  # 16-byte blake2b of the canonical example -> first line (~100 bytes each)
    token_counts = array("l")  # total tokens per valid example, 8 bytes each, for min/p95/max
    assistant_tokens = train_tokens = over_context = 0
    first_without_system = 0
    first_content_line = 0

    try:
        with open(spath, "rb") as f:
            lineno = 0
            for raw in f:
                lineno += 1
                if lineno == 1:
                    if raw.startswith(UTF16_BOMS):
                        add(1, "the file is UTF-16; save it as UTF-8 (with or without a byte-order mark)")
                        first_content_line = 1
                        break
                    if raw.startswith(UTF8_BOM):
                        raw = raw[len(UTF8_BOM):]
                try:
                    text, had_newline = _decode(raw)
                except UnicodeDecodeError as exc:
                    bad = raw[exc.start:exc.start + 1].hex()
                    add(lineno, f"invalid UTF-8 at byte {exc.start + 1} of the line (0x{bad}); save the file as UTF-8")
                    first_content_line = first_content_line or lineno
                    continue
                if not text.strip():
                    report.n_blank += 1
                    add(lineno, "blank line (skipped)", "warning")
                    continue
                if not first_content_line:
                    first_content_line = lineno
                    if text.lstrip().startswith("["):
                        add(lineno, "the file is one JSON array; JSONL needs one JSON object per line")
                        break
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    # "Unterminated string starting at" + " at column 7" would say "at" twice
                    what = f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
                    if not had_newline:
                        add(lineno, f"invalid JSON: the last line looks truncated (no newline at the end; {what[0].lower() + what[1:]})")
                    else:
                        add(lineno, f"invalid JSON: {what}")
                    continue
                except RecursionError:
                    add(lineno, "invalid JSON: nested too deeply")
                    continue
                errors, warnings, messages = check(obj, lineno)
                for message in errors:
                    add(lineno, message)
                for message in warnings:
                    add(lineno, message, "warning")
                if errors:
                    continue
                forged = control_token_warnings(messages, control_tokens)
                for message in forged:
                    add(lineno, message, "warning")
                report.n_control_text += bool(forged)
                if token_counter is not None:
                    try:
                        total, assistant = token_counter(messages)
                    except Exception as exc:  # a chat template may reject an order of roles
                        add(lineno, f"cannot apply the chat template or tokenize: {type(exc).__name__}: {exc}")
                        continue
                    token_counts.append(int(total))
                    assistant_tokens += int(assistant)
                    train_tokens += min(int(total), context_length) if context_length else int(total)
                    if context_length and total > context_length:
                        over_context += 1
                        add(lineno, f"example is {total} tokens, longer than the context of {context_length}; it will be truncated", "warning")
                report.n_examples += 1
                for msg in messages:
                    report.role_counts[msg["role"]] += 1
                if not any(m["role"] == "system" for m in messages):
                    report.n_without_system += 1
                    first_without_system = first_without_system or lineno
                key = hashlib.blake2b(canonical_json(obj).encode("utf-8"), digest_size=16).digest()
                first = seen.setdefault(key, lineno)
                if first != lineno:
                    report.n_duplicates += 1
                    add(lineno, f"duplicate of line {first}", "warning")
            report.n_lines = lineno
    except OSError as exc:
        report.readable = False
        add(0, f"cannot read: {exc.strerror or exc}", force=True)
        return report

    # File-level findings: always stored, after the per-line ones.
    if report.n_lines == 0 or not first_content_line:
        add(0, "the file is empty" if report.n_lines == 0 else "the file has only blank lines", force=True)
    elif report.n_examples == 0 and report.n_errors == 0:
        add(0, "no usable examples", force=True)
    if chat and 0 < report.n_examples < MIN_EXAMPLES:
        add(0, f"only {report.n_examples} examples; Azure AI Foundry requires at least {MIN_EXAMPLES}", "warning", force=True)
    if chat and report.n_without_system:
        add(first_without_system,
            f"no system message ({report.n_without_system} of {report.n_examples} examples have none; "
            "the model learns to answer without one)", "warning", force=True)
    if token_counter is not None:
        ordered = sorted(token_counts)
        report.token_stats = {
            "count": len(ordered),
            "min": ordered[0] if ordered else 0,
            "mean": sum(ordered) / len(ordered) if ordered else 0.0,
            "p95": _percentile(ordered, 95) if ordered else 0,
            "max": ordered[-1] if ordered else 0,
            "total": sum(ordered),
            "assistant": assistant_tokens,
            "train_per_epoch": train_tokens,
            "over_context": over_context,
        }
    return report


def iter_json_lines(path) -> Iterator["tuple[int, Any]"]:
    """(line number, parsed object) of each non-blank JSON line, streamed; undecodable lines
    are skipped. Meant for a file a validator already accepted; raises OSError if unreadable."""
    with open(str(path), "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            try:
                text, _ = _decode(raw)
                if not text.strip():
                    continue
                yield lineno, json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                continue


def iter_valid_examples(path) -> Iterator["tuple[int, list[dict]]"]:
    """(line number, messages) of each valid example, streamed; invalid lines are skipped."""
    for lineno, obj in iter_json_lines(path):
        errors, _ = check_example(obj)
        if not errors:
            yield lineno, obj["messages"]
