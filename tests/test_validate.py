"""`phitune data validate` and phitune.data.validate: every error class with its line
number, warnings, the summary numbers, streaming memory, and the CLI's exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from phitune.cli import main
from phitune.data.validate import Problem, iter_valid_examples, validate_file

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def chat(user: str = "Hi", answer: str = "Hello!", system: bool = True) -> str:
    messages = ([SYSTEM] if system else []) + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages})


def good_lines(n: int) -> list:
    return [chat(f"question {i}", f"answer {i}") for i in range(n)]


def write(tmp_path: Path, lines, name: str = "data.jsonl", *, eol: str = "\n", final_eol: bool = True,
          prefix: bytes = b"") -> str:
    """Write lines (str or bytes) joined by eol; returns the path as a string."""
    parts = [line if isinstance(line, bytes) else line.encode("utf-8") for line in lines]
    data = eol.encode().join(parts) + (eol.encode() if final_eol and parts else b"")
    path = tmp_path / name
    path.write_bytes(prefix + data)
    return str(path)


def errors_of(report) -> list:
    return [(p.line, p.message) for p in report.errors]


def warnings_of(report) -> list:
    return [(p.line, p.message) for p in report.warnings]


# ------------------------------------------------------------------ error classes
# (bad line placed at line 11 after 10 good lines, expected error messages on line 11)
BAD_LINES = {
    "invalid_json": ('{"messages": [}', ["invalid JSON: Expecting value at column 15"]),
    "not_object": ('["a", "b"]', ["expected a JSON object per line, got array"]),
    "not_object_string": ('"hello"', ["expected a JSON object per line, got string"]),
    "messages_missing": ('{"conversation": []}', ['no "messages" key']),
    "messages_not_list": ('{"messages": {"role": "user"}}', ['"messages" must be a list, got object']),
    "messages_empty": ('{"messages": []}', ['"messages" is empty']),
    "message_not_object": (
        '{"messages": ["hi", {"role": "assistant", "content": "x"}]}',
        ["message 1: expected an object, got string"],
    ),
    "no_role": (
        '{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}',
        ['message 1: no "role"'],
    ),
    "no_content": (
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
        ['message 1: no "content"'],
    ),
    "bad_role": (
        '{"messages": [{"role": "tool", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
        ['message 1: role "tool" is not one of system, user, assistant'],
    ),
    "unknown_message_key": (
        '{"messages": [{"role": "user", "content": "hi", "lang": "en"}, {"role": "assistant", "content": "x"}]}',
        ['message 1: unknown key "lang" (allowed: role, content, name, weight)'],
    ),
    "empty_content": (
        '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}',
        ["message 1: content is empty"],
    ),
    "non_string_content": (
        '{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": null}]}',
        ["message 1: content must be a string, got array", "message 2: content must be a string, got null"],
    ),
    "bad_weight": (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0.5}]}',
        ["message 2: weight must be 0 or 1, got 0.5"],
    ),
    "bool_weight": (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": true}]}',
        ["message 2: weight must be 0 or 1, got true"],
    ),
    "weight_on_user": (
        '{"messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "x"}]}',
        ["message 1: weight is only allowed on assistant messages"],
    ),
    "no_assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', ["no assistant message to learn from"]),
    "all_weight_zero": (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0},'
        ' {"role": "user", "content": "and?"}, {"role": "assistant", "content": "y", "weight": 0}]}',
        ["every assistant message has weight 0: nothing to learn from"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_each_error_class_is_reported_on_its_line(tmp_path, case):
    bad, expected = BAD_LINES[case]
    path = write(tmp_path, good_lines(10) + [bad] + good_lines(1))
    report = validate_file(path)
    assert errors_of(report) == [(11, m) for m in expected]
    assert not report.ok
    assert report.n_examples == 11  # the good lines still count
    assert str(report.errors[0]) == f"{path}:11: {expected[0]}"


def test_invalid_utf8_is_reported_with_its_byte(tmp_path):
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'  # latin-1 e-acute
    path = write(tmp_path, good_lines(3) + [bad])
    report = validate_file(path)
    assert errors_of(report) == [(4, "invalid UTF-8 at byte 47 of the line (0xe9); save the file as UTF-8")]


def test_json_array_file(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([json.loads(line) for line in good_lines(12)], indent=2))
    report = validate_file(path)
    assert errors_of(report) == [(1, "the file is one JSON array; JSONL needs one JSON object per line")]
    assert report.n_errors == 1  # stops there instead of one error per line


def test_empty_file_and_blank_only_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    report = validate_file(empty)
    assert errors_of(report) == [(0, "the file is empty")]
    assert str(report.errors[0]) == f"{empty}: the file is empty"

    blank = write(tmp_path, ["", "  "], "blank.jsonl")
    report = validate_file(blank)
    assert errors_of(report) == [(0, "the file has only blank lines")]


def test_truncated_last_line(tmp_path):
    path = write(tmp_path, good_lines(10) + ['{"messages": [{"role": "user", "cont'], final_eol=False)
    report = validate_file(path)
    assert errors_of(report) == [
        (11, "invalid JSON: the last line looks truncated (no newline at the end; "
             "unterminated string starting at column 32)")
    ]


def test_last_line_without_newline_is_fine_when_complete(tmp_path):
    path = write(tmp_path, good_lines(10), final_eol=False)
    report = validate_file(path)
    assert report.ok and report.n_examples == 10 and report.n_warnings == 0


def test_utf16_file(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes("\n".join(good_lines(10)).encode("utf-16"))
    report = validate_file(path)
    assert errors_of(report) == [(1, "the file is UTF-16; save it as UTF-8 (with or without a byte-order mark)")]


def test_all_errors_of_one_line_are_listed(tmp_path):
    bad = '{"messages": [{"role": "bot", "content": ""}, {"role": "user", "content": 3, "x": 1}]}'
    report = validate_file(write(tmp_path, [bad]))
    assert errors_of(report) == [
        (1, 'message 1: role "bot" is not one of system, user, assistant'),
        (1, "message 1: content is empty"),
        (1, 'message 2: unknown key "x" (allowed: role, content, name, weight)'),
        (1, "message 2: content must be a string, got number"),
        (1, "no assistant message to learn from"),
    ]


# ------------------------------------------------------------------ accepted input and warnings
def test_bom_and_crlf_are_accepted(tmp_path):
    path = write(tmp_path, good_lines(10), eol="\r\n", prefix=b"\xef\xbb\xbf")
    report = validate_file(path)
    assert report.ok and report.n_examples == 10 and report.problems == []
    assert [line for line, _ in iter_valid_examples(path)] == list(range(1, 11))
    assert next(iter_valid_examples(path))[1][1]["content"] == "question 0"


def test_weight_zero_on_an_earlier_turn_and_name_are_fine(tmp_path):
    line = json.dumps({"messages": [
        SYSTEM,
        {"role": "user", "content": "hi", "name": "maya"},
        {"role": "assistant", "content": "old answer", "weight": 0},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "better answer", "weight": 1},
    ]})
    report = validate_file(write(tmp_path, good_lines(9) + [line]))
    assert report.ok and report.problems == []


def test_blank_lines_are_skipped_with_a_warning(tmp_path):
    path = write(tmp_path, good_lines(5) + ["", "   "] + good_lines(6)[5:] + good_lines(11)[6:])
    report = validate_file(path)
    assert report.ok
    assert warnings_of(report) == [(6, "blank line (skipped)"), (7, "blank line (skipped)")]
    assert report.n_examples == 11 and report.n_blank == 2 and report.n_lines == 13


def test_top_level_keys(tmp_path):
    tools = json.dumps({"messages": json.loads(chat())["messages"], "tools": [], "parallel_tool_calls": False})
    extra = json.dumps({"messages": json.loads(chat("other"))["messages"], "id": 7})
    logged = json.dumps({"messages": json.loads(chat("served"))["messages"], "metadata": {"model_version": "3"}})
    report = validate_file(write(tmp_path, good_lines(10) + [tools, extra, logged]))
    assert report.ok  # a request log's provenance ("metadata") is no warning on every line
    assert warnings_of(report) == [(12, 'unknown top-level key "id" (ignored; expected "messages")')]


def test_fewer_than_ten_examples_warns(tmp_path):
    path = write(tmp_path, good_lines(3))
    report = validate_file(path)
    assert report.ok
    assert warnings_of(report) == [(0, "only 3 examples; Azure AI Foundry requires at least 10")]
    assert str(report.warnings[0]) == f"{path}: warning: only 3 examples; Azure AI Foundry requires at least 10"


def test_duplicates_point_to_the_first_line(tmp_path):
    lines = good_lines(10)
    # Same example spelt differently (spaces, key order) is still a duplicate.
    respelt = json.dumps({"messages": [{"content": m["content"], "role": m["role"]} for m in json.loads(lines[2])["messages"]]}, indent=None, separators=(" ,", " : "))
    report = validate_file(write(tmp_path, lines + [lines[0], respelt]))
    assert report.ok
    assert warnings_of(report) == [(11, "duplicate of line 1"), (12, "duplicate of line 3")]
    assert report.n_duplicates == 2


def test_missing_system_message_is_one_warning_with_a_count(tmp_path):
    lines = good_lines(10) + [chat("a", "b", system=False), chat("c", "d", system=False)]
    report = validate_file(write(tmp_path, lines))
    assert report.ok
    assert warnings_of(report) == [
        (11, "no system message (2 of 12 examples have none; the model learns to answer without one)")
    ]


def word_counter(messages):
    """A stand-in tokenizer: one token per word plus 2 per message (role tag and end tag)."""
    total = sum(len(m["content"].split()) + 2 for m in messages)
    trained = sum(len(m["content"].split()) + 1 for m in messages if m["role"] == "assistant" and m.get("weight", 1))
    return total, trained


def test_long_examples_warn_about_truncation(tmp_path):
    long = chat("word " * 40, "ok")
    report = validate_file(write(tmp_path, good_lines(10) + [long]), token_counter=word_counter, context_length=32)
    assert report.ok
    assert warnings_of(report) == [(11, "example is 52 tokens, longer than the context of 32; it will be truncated")]
    assert report.token_stats["over_context"] == 1
    assert report.token_stats["train_per_epoch"] == 10 * 15 + 32  # 15 per short example; the long one up to the context


def test_token_counter_failure_is_an_error_on_the_line(tmp_path):
    def picky(messages):
        if messages[-1]["content"] == "answer 3":
            raise ValueError("roles must alternate")
        return word_counter(messages)

    report = validate_file(write(tmp_path, good_lines(10)), token_counter=picky)
    assert errors_of(report) == [(4, "cannot apply the chat template or tokenize: ValueError: roles must alternate")]


def test_summary_numbers_on_a_known_file(tmp_path):
    lines = [chat("one two three", "four five", system=i % 2 == 0) for i in range(10)]
    lines = [line.replace("four five", f"four five {'x ' * i}".strip()) for i, line in enumerate(lines)]
    lines.append(json.dumps({"messages": [
        SYSTEM,
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b c", "weight": 0},
        {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"},
    ]}))
    path = write(tmp_path, lines)
    report = validate_file(path, token_counter=word_counter, context_length=4096)
    assert report.ok and report.n_examples == 11
    assert report.role_counts == {"system": 6, "user": 12, "assistant": 12}
    # Example i: system (5 words + 2) when i is even, user 3 + 2, assistant (2 + i) + 2;
    # the last one: 7 + (1 + 2) + (2 + 2) + (1 + 2) + (1 + 2) = 20.
    totals = sorted([(7 if i % 2 == 0 else 0) + 5 + 4 + i for i in range(10)] + [20])
    assert (totals[0], totals[-1], sum(totals)) == (10, 24, 190)
    ts = report.token_stats
    assert (ts["min"], ts["max"], ts["total"]) == (10, 24, 190)
    assert ts["mean"] == pytest.approx(sum(totals) / 11)
    assert ts["p95"] == totals[10]  # nearest rank: ceil(0.95 * 11) = 11th
    assert ts["assistant"] == sum(3 + i for i in range(10)) + 2  # weight-0 turn not counted
    assert ts["train_per_epoch"] == sum(totals)
    summary = report.format_summary()
    assert summary.splitlines() == [
        f"{path}: 11 examples in 11 lines",
        "  messages: 6 system, 12 user, 12 assistant",
        "  tokens per example (chat template applied): min 10, mean 17.3, p95 24, max 24",
        "  assistant (trained) tokens: 77; training tokens per epoch: 190 "
        "(examples capped at 4096 tokens)",
        "  0 errors, 1 warnings: usable",
    ]


def test_problem_str():
    assert str(Problem("a.jsonl", 3, "bad")) == "a.jsonl:3: bad"
    assert str(Problem("a.jsonl", 3, "meh", "warning")) == "a.jsonl:3: warning: meh"
    assert str(Problem("a.jsonl", 0, "cannot read: gone")) == "a.jsonl: cannot read: gone"


# ------------------------------------------------------------------ unreadable files
def test_missing_file_and_directory(tmp_path):
    report = validate_file(tmp_path / "nope.jsonl")
    assert [str(p) for p in report.problems] == [f"{tmp_path / 'nope.jsonl'}: cannot read: No such file or directory"]
    assert not report.ok and not report.readable
    report = validate_file(tmp_path)
    assert [str(p) for p in report.problems] == [f"{tmp_path}: cannot read: Is a directory"]


def test_permission_denied(tmp_path, monkeypatch):
    path = Path(write(tmp_path, good_lines(10)))
    if os.name == "posix" and os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads any file: make open() refuse instead
        import phitune.data.validate as validate_mod

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(validate_mod, "open", denied, raising=False)
    try:
        report = validate_file(path)
    finally:
        path.chmod(0o600)
    assert [str(p) for p in report.problems] == [f"{path}: cannot read: Permission denied"]


# ------------------------------------------------------------------ streaming
def test_streams_a_large_file_in_bounded_memory(tmp_path):
    """50k examples of ~600 bytes (~30 MB): the validator keeps a 16-byte hash per
    example, not the examples, so its peak Python allocation stays a fraction of the file."""
    path = tmp_path / "big.jsonl"
    filler = "lorem ipsum dolor sit amet " * 20
    with open(path, "w", encoding="utf-8") as f:
        for i in range(50_000):
            f.write(chat(f"question {i} {filler}", f"answer {i}") + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        report = validate_file(path, token_counter=lambda m: (len(m), 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.n_examples == 50_000
    assert report.token_stats["p95"] == 3
    assert size > 25_000_000
    assert peak < 12_000_000, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"


def test_stored_problems_are_capped_but_counted(tmp_path):
    report = validate_file(write(tmp_path, ["nope"] * 50), max_stored=5)
    assert len(report.problems) == 5 and report.n_errors == 50


def test_iter_valid_examples_skips_bad_lines(tmp_path):
    path = write(tmp_path, [chat("a", "b"), "", "garbage", BAD_LINES["no_assistant"][0], chat("c", "d")])
    assert [(line, msgs[-1]["content"]) for line, msgs in iter_valid_examples(path)] == [(1, "b"), (5, "d")]


# ------------------------------------------------------------------ CLI
def run_cli(capsys, *args):
    code = main(["data", "validate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_good_file_exits_0(tmp_path, capsys):
    path = write(tmp_path, good_lines(12))
    code, out, err = run_cli(capsys, path, "--no-tokens")
    assert code == 0
    assert out.splitlines()[0] == f"{path}: 12 examples in 12 lines"
    assert "0 errors, 0 warnings: usable" in out


def test_cli_bad_file_exits_1_and_caps_output(tmp_path, capsys):
    path = write(tmp_path, good_lines(10) + ["garbage"] * 5)
    code, out, err = run_cli(capsys, path, "--no-tokens", "--max-problems", "2")
    assert code == 1
    lines = out.splitlines()
    assert lines[:3] == [
        f"{path}:11: invalid JSON: Expecting value at column 1",
        f"{path}:12: invalid JSON: Expecting value at column 1",
        "... and 3 more",
    ]
    assert "5 errors, 0 warnings: NOT usable" in out


def test_cli_warnings_only_exits_0_and_quiet_hides_them(tmp_path, capsys):
    path = write(tmp_path, good_lines(3))
    code, out, _ = run_cli(capsys, path, "--no-tokens")
    assert code == 0 and "warning: only 3 examples" in out
    code, out, _ = run_cli(capsys, path, "--no-tokens", "--quiet")
    assert code == 0 and out == ""


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_cli_unreadable_exits_1_without_traceback(tmp_path, capsys, kind):
    path = str(tmp_path / "nope.jsonl") if kind == "missing" else str(tmp_path)
    code, out, err = run_cli(capsys, path, "--no-tokens")
    assert code == 1
    assert out.startswith(f"{path}: cannot read: ") and "Traceback" not in out + err


def test_cli_unknown_model_exits_2(tmp_path, capsys):
    code, out, err = run_cli(capsys, write(tmp_path, good_lines(10)), "--model", "no-such-model")
    assert code == 2 and "unknown model 'no-such-model'" in err and out == ""


def test_cli_tokenizer_that_cannot_load_falls_back_with_a_note(tmp_path, capsys, monkeypatch):
    import phitune.commands.data as data_cmd

    def offline(model_cfg):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nto load this file")

    monkeypatch.setattr(data_cmd, "load_tokenizer", offline)
    code, out, err = run_cli(capsys, write(tmp_path, good_lines(10)), "--model", "phi3-mini-4k")
    assert code == 0
    assert err.splitlines() == [
        "note: no token counts: cannot load the tokenizer of model 'phi3-mini-4k' "
        "(OSError: We couldn't connect to 'https://huggingface.co' to load this file)"
    ]
    assert "tokens: not counted (no tokenizer)" in out


def test_cli_counts_tokens_with_the_model(tmp_path, capsys, tiny_tokenizer):
    from phitune.chat import count_tokens

    lines = good_lines(10)
    counts = sorted(count_tokens(tiny_tokenizer, json.loads(line)["messages"])[0] for line in lines)
    code, out, err = run_cli(capsys, write(tmp_path, lines))  # default tiny-phi3: context 512
    assert code == 0 and err == ""
    assert (f"  tokens per example (chat template applied): min {counts[0]}, mean {sum(counts) / 10:.1f}, "
            f"p95 {counts[-1]}, max {counts[-1]}") in out.splitlines()
    assert f"training tokens per epoch: {sum(counts):,} (examples capped at 512 tokens)" in out


def test_cli_real_subprocess(tmp_path, repo_root):
    exe = Path(sys.executable).with_name("phitune")
    good = write(tmp_path, good_lines(10), "good.jsonl")
    bad = write(tmp_path, good_lines(10) + ['{"messages": 1}'], "bad.jsonl")
    ok = subprocess.run([str(exe), "data", "validate", good], capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr and "0 errors" in ok.stdout
    fail = subprocess.run([str(exe), "data", "validate", bad, "--no-tokens"], capture_output=True, text=True,
                          cwd=repo_root, timeout=120)
    assert fail.returncode == 1 and "Traceback" not in fail.stderr
    assert f'{bad}:11: "messages" must be a list, got number' in fail.stdout


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"phitune {version('phitune')}"
