"""`phitune` command line: each subcommand lives in phitune.commands.<name>.

A command module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the default; the return value is the exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["data", "compare", "promote", "models", "eval", "serve", "chat", "deployments", "deploy", "undeploy", "export",
            "sweep"]


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="phitune", description="Fine-tune, sweep, compare, promote and serve small chat models.")
    try:
        release = version("phitune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        release = "unknown (not installed)"
    parser.add_argument("--version", action="version", version=f"phitune {release}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"phitune.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
