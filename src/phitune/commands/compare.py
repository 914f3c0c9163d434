"""`phitune compare`: a leaderboard of runs (an experiment, or one sweep's trials) in the terminal.

Exit 0 with the table (or csv/json on stdout), 1 when the store, experiment or sweep
does not exist or no run has the --metric (the metrics they have are listed).
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="leaderboard of runs: trial, state, swept params, metrics",
                              description=__doc__.splitlines()[0])
    p.add_argument("--experiment", help="MLflow experiment (default: phitune)")
    p.add_argument("--sweep", metavar="PARENT_RUN_ID",
                   help="only the trials of this sweep (its MLflow parent run id, or `latest`)")
    p.add_argument("--metric", help="rank by this metric (default: the runs' task's: full_valid_loss for chat, "
                                    "full_valid_macro_f1 for task=classification)")
    p.add_argument("--direction", choices=["min", "max"],
                   help="min: lower is better (default for *loss, perplexity); max: higher (default for *accuracy)")
    p.add_argument("--top", type=_count, metavar="N", help="show the first N rows only")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    p.set_defaults(func=run)


def _count(text: str) -> int:
    import argparse

    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text}: expected a number of rows (0 or more)")
    return int(text)


def run(args) -> int:
    from mlflow.exceptions import MlflowException

    from phitune.errors import PhituneError
    from phitune.models.uri import client_for, tracking_uri
    from phitune.redact import redact_text
    from phitune.registry.compare import leaderboard, render

    try:
        client = client_for(tracking_uri(args.tracking_uri))
        lb = leaderboard(client, experiment=args.experiment, sweep=args.sweep, metric=args.metric,
                         direction=args.direction, top=args.top)
    except PhituneError as exc:
        print(f"phitune compare: {exc}", file=sys.stderr)
        return exc.exit_code
    except MlflowException as exc:  # the store: unreachable server, unknown URI scheme, ...
        print(f"phitune compare: tracking store {redact_text(tracking_uri(args.tracking_uri))}: "
              f"{redact_text(str(exc.message).splitlines()[0])[:500]}", file=sys.stderr)
        return 1
    out = render(lb, args.format)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0
