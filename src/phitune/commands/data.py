"""`phitune data validate FILE [--model NAME] [--task auto|chat|classification]`: check training data.

--task auto (the default) reads a file whose first line has a "label" key as
classification data ({"messages"|"text", "label"}), any other as chat data.

Exit 0 when the file is usable (warnings allowed), 1 when it is not, 2 for a bad
command line (e.g. an unknown --model). Problems go to stdout as `FILE:LINE: message`,
notes about the tooling (no tokenizer) to stderr.
"""
from __future__ import annotations

import json
import os
import sys

from phitune.chat import chat_tokens, count_tokens
from phitune.confdir import load_model_config
from phitune.errors import PhituneError
from phitune.modeling.loader import load_tokenizer


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="check chat JSONL training data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    v = sub.add_parser(
        "validate",
        help="check a chat JSONL file as Azure AI Foundry / OpenAI would, and count its tokens",
        description="Check a chat-completion JSONL file and print every problem as FILE:LINE: message, then a summary.",
    )
    v.add_argument("file", metavar="FILE", help="chat JSONL: one {\"messages\": [...]} object per line")
    v.add_argument("--model", default="tiny-phi3",
                   help="conf/model/NAME.yaml (or a YAML path) whose tokenizer and chat template count tokens (default: tiny-phi3)")
    v.add_argument("--task", choices=("auto", "chat", "classification"), default="auto",
                   help="the data's task; auto (default): classification when the first line has a \"label\" key")
    v.add_argument("--train-file", metavar="TRAIN",
                   help="classification: FILE is a validation file; its labels must appear in TRAIN")
    v.add_argument("--labels", metavar="A,B,...", help="classification: the only allowed labels (as task.labels)")
    v.add_argument("--no-tokens", action="store_true", help="skip token counting (faster; no tokenizer needed)")
    v.add_argument("--quiet", "-q", action="store_true", help="print errors only: no warnings, no summary")
    v.add_argument("--max-problems", type=int, default=200, metavar="N",
                   help="print at most N problems, then a count of the rest (default: 200)")
    v.add_argument("--safety", action="store_true",
                   help="also screen every message with the content filter: flagged examples print as "
                        "FILE:LINE: category severity and make the file not usable (exit 1)")
    v.add_argument("--safety-config", metavar="YAML", help="content-filter settings for --safety: a preset (default, strict) or a YAML file (default: local, medium)")
    v.set_defaults(data_func=_validate)
    i = sub.add_parser(
        "inspect",
        help="show one conversation as training and serving see it: tokens, ids, loss, generation prompt",
        description="Render one example with the model's chat template and show each token, its id, whether it "
                    "carries loss, and the prompt serving builds for the turns before its last assistant turn.",
    )
    i.add_argument("file", metavar="FILE", help="chat JSONL")
    i.add_argument("--line", type=int, metavar="N", help="the example on line N (default: the first valid one)")
    i.add_argument("--model", default="tiny-phi3", help="conf/model/NAME.yaml or a YAML path (default: tiny-phi3)")
    i.add_argument("--format", choices=("text", "json"), default="text")
    i.set_defaults(data_func=_inspect)

    def dispatch(args) -> int:
        if not getattr(args, "data_func", None):
            parser.print_help()
            return 2
        return args.data_func(args)

    parser.set_defaults(func=dispatch)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _tokenizer_for(model: str):
    """(tokenizer or None, model config) for a model name or YAML path; the tokenizer is
    None, with a note, when it cannot be had (a Hub model offline, a missing folder...).

    Raises PhituneError for an unknown model name: that is a typo, not an outage.
    """
    model_cfg = load_model_config(model)
    try:
        return load_tokenizer(model_cfg), model_cfg
    except Exception as exc:  # offline Hub model, missing folder, broken files: all the same to the user
        detail = " ".join(str(exc).split())  # one line
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        _note(f"no token counts: cannot load the tokenizer of model {model!r} ({type(exc).__name__}: {detail})")
        return None, model_cfg


def _validate(args) -> int:
    from phitune.data.validate import validate_file

    tokenizer, counter, context_length, control = None, None, None, ()
    if not args.no_tokens:
        try:
            tokenizer, model_cfg = _tokenizer_for(args.model)
        except PhituneError as exc:
            print(f"phitune data validate: {exc}", file=sys.stderr)
            return 2
        context_length = int(model_cfg.context_length)
    classify = args.task == "classification" or (args.task == "auto" and _is_classification(args.file))
    if tokenizer is not None:
        control = chat_tokens(tokenizer).control_strings
        counter = lambda messages: count_tokens(tokenizer, messages)  # noqa: E731
        if classify:
            from phitune.classify.encode import count_input_tokens

            counter = lambda messages: (count_input_tokens(tokenizer, messages), 0)  # noqa: E731
    kwargs = dict(token_counter=counter, context_length=context_length, control_tokens=control)
    if classify:
        report = _validate_classification(args, kwargs)
        if report is None:
            return 1
    else:
        report = validate_file(args.file, **kwargs)
    try:
        shown = 0
        limit = max(0, args.max_problems)
        for problem in report.problems:
            if args.quiet and problem.level != "error":
                continue
            if shown >= limit:
                break
            print(problem)
            shown += 1
        total = report.n_errors + (0 if args.quiet else report.n_warnings)
        if total > shown:
            print(f"... and {total - shown} more")
        flagged = _safety(args) if args.safety and report.readable else 0
        if not args.quiet and report.readable:
            print(report.format_summary())
        sys.stdout.flush()
    except BrokenPipeError:  # `phitune data validate big.jsonl | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        flagged = 0
    except PhituneError as exc:  # a bad --safety-config, an unreachable Azure filter
        print(f"phitune data validate: {exc}", file=sys.stderr)
        return 2
    return 0 if report.ok and not flagged else 1


def _is_classification(path: str) -> bool:
    from phitune.classify.data import looks_like_classification

    return looks_like_classification(path)


def _validate_classification(args, kwargs):
    """The classification report of args.file; None (after a message) when --train-file is unusable."""
    from phitune.classify.data import validate_classification_file

    if args.labels:
        known, source = [x.strip() for x in args.labels.split(",") if x.strip()], "--labels"
    elif args.train_file:
        train = validate_classification_file(args.train_file)
        if not train.readable or not train.label_counts:
            print(f"phitune data validate: --train-file {args.train_file}: no usable labelled example", file=sys.stderr)
            return None
        known, source = sorted(train.label_counts), f"the labels of {args.train_file}"
    else:
        known, source = None, ""
    return validate_classification_file(args.file, known, source, training=not args.train_file, **kwargs)


def _safety(args) -> int:
    """The content-filter screen (phitune.safety.screen); returns the number of flagged examples."""
    from phitune.safety.screen import print_file_screen

    return print_file_screen(args.file, args.safety_config)


def _pick_example(path: str, line: int | None) -> tuple[int, list]:
    from phitune.data.validate import check_example, iter_valid_examples

    if line is None:
        for lineno, messages in iter_valid_examples(path):
            return lineno, messages
        raise PhituneError(f"{path}: no valid example; run `phitune data validate {path}`")
    if line < 1:
        raise PhituneError(f"--line {line}: lines count from 1")
    raw, n_lines = None, 0
    with open(path, "rb") as f:
        for n_lines, text in enumerate(f, 1):
            if n_lines == line:
                raw = text
                break
    if raw is None:
        raise PhituneError(f"{path}:{line}: the file has only {n_lines} lines")
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PhituneError(f"{path}:{line}: not a JSON object; run `phitune data validate {path}`") from None
    errors, _ = check_example(obj)
    if errors:
        raise PhituneError(f"{path}:{line}: {errors[0]}")
    return line, obj["messages"]


def _inspect(args) -> int:
    from phitune.data.inspect import format_text, inspect_conversation

    try:
        lineno, messages = _pick_example(args.file, args.line)
        model_cfg = load_model_config(args.model)
        tokenizer = load_tokenizer(model_cfg)
        info = inspect_conversation(tokenizer, messages, int(model_cfg.context_length))
    except OSError as exc:
        print(f"phitune data inspect: {args.file}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except PhituneError as exc:
        print(f"phitune data inspect: {exc}", file=sys.stderr)
        return 1
    try:
        if args.format == "json":
            print(json.dumps(dict(info, file=args.file, line=lineno), ensure_ascii=False))
        else:
            print(format_text(f"{args.file}:{lineno}", info))
        sys.stdout.flush()
    except BrokenPipeError:  # `phitune data inspect FILE | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
