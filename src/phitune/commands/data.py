"""`phitune data validate FILE [--model NAME]`: check a chat JSONL file before training.

Exit 0 when the file is usable (warnings allowed), 1 when it is not, 2 for a bad
command line (e.g. an unknown --model). Problems go to stdout as `FILE:LINE: message`,
notes about the tooling (no tokenizer) to stderr.
"""
from __future__ import annotations

import os
import sys

from phitune.errors import PhituneError


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
    v.add_argument("--no-tokens", action="store_true", help="skip token counting (faster; no tokenizer needed)")
    v.add_argument("--quiet", "-q", action="store_true", help="print errors only: no warnings, no summary")
    v.add_argument("--max-problems", type=int, default=200, metavar="N",
                   help="print at most N problems, then a count of the rest (default: 200)")
    v.add_argument("--safety", action="store_true",
                   help="also screen every message with the content filter: flagged examples print as "
                        "FILE:LINE: category severity and make the file not usable (exit 1)")
    v.add_argument("--safety-config", metavar="YAML", help="content-filter settings for --safety (default: local, medium)")
    v.set_defaults(data_func=_validate)

    def dispatch(args) -> int:
        if not getattr(args, "data_func", None):
            parser.print_help()
            return 2
        return args.data_func(args)

    parser.set_defaults(func=dispatch)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def token_counter_for(model: str):
    """(counter, context_length) for a model name or YAML path; counter is None when
    the tokenizer cannot be had (model code not installed, Hub model offline...).

    Raises PhituneError for an unknown model name: that is a typo, not an outage.
    """
    from phitune.confdir import load_model_config

    model_cfg = load_model_config(model)
    context_length = int(model_cfg.context_length)
    try:
        from phitune.data.encode import count_tokens
        from phitune.modeling.loader import load_tokenizer
    except ImportError as exc:
        _note(f"no token counts: phitune's model code is not available ({exc})")
        return None, context_length
    try:
        tokenizer = load_tokenizer(model_cfg)
    except Exception as exc:  # offline Hub model, missing folder, broken files: all the same to the user
        detail = " ".join(str(exc).split())  # one line
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        _note(f"no token counts: cannot load the tokenizer of model {model!r} ({type(exc).__name__}: {detail})")
        return None, context_length

    def counter(messages):
        return count_tokens(tokenizer, messages)

    return counter, context_length


def _validate(args) -> int:
    from phitune.data.validate import validate_file

    counter = context_length = None
    if not args.no_tokens:
        try:
            counter, context_length = token_counter_for(args.model)
        except PhituneError as exc:
            print(f"phitune data validate: {exc}", file=sys.stderr)
            return 2
    report = validate_file(args.file, token_counter=counter, context_length=context_length)
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


def _safety(args) -> int:
    """Issue 5's content-filter screen (phitune.safety.screen); returns the number of flagged examples."""
    from phitune.safety.screen import print_file_screen

    return print_file_screen(args.file, args.safety_config)
