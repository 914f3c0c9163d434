"""`phitune compare`: a leaderboard of runs (an experiment, or one sweep's trials) in the terminal.

Exit 0 with the table (or csv/json on stdout), 1 when the store, experiment or sweep
does not exist.
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="leaderboard of runs: trial, state, swept params, metrics",
                              description=__doc__.splitlines()[0])
    p.add_argument("--experiment", help="MLflow experiment (default: phitune)")
    p.add_argument("--sweep", metavar="PARENT_RUN_ID",
                   help="only the trials of this sweep (its MLflow parent run id, or `latest`)")
    p.add_argument("--metric", default="full_valid_loss", help="rank by this metric (default: full_valid_loss)")
    p.add_argument("--direction", choices=["min", "max"],
                   help="min: lower is better (default for *loss, perplexity); max: higher (default for *accuracy)")
    p.add_argument("--top", type=int, metavar="N", help="show the first N rows only")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    p.set_defaults(func=run)


def run(args) -> int:
    from phitune.errors import PhituneError
    from phitune.models.uri import client_for, tracking_uri
    from phitune.registry.compare import leaderboard, render

    try:
        client = client_for(tracking_uri(args.tracking_uri))
        lb = leaderboard(client, experiment=args.experiment, sweep=args.sweep, metric=args.metric,
                         direction=args.direction, top=args.top)
    except PhituneError as exc:
        print(f"phitune compare: {exc}", file=sys.stderr)
        return exc.exit_code
    out = render(lb, args.format)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0
