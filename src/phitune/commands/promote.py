"""`phitune promote --name MODEL`: register the best finished run's model; move @champion only if it wins.

Exit 0 when a version was registered (as @champion or @challenger) or already is
the champion; 1 when the comparison was refused (other validation data, no metric)
or there was nothing to promote. See phitune.registry.promote for the gate.
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("promote", help="best run -> registered model version; @champion only if it beats the current one",
                              description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="candidates: the finished runs of this experiment (default: phitune)")
    which.add_argument("--sweep", metavar="PARENT_RUN_ID", help="candidates: this sweep's trials (or `latest`)")
    which.add_argument("--run", metavar="RUN_ID", help="candidate: this run only")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--metric", help="compare by this metric (default: the runs' task's: full_valid_loss for chat, "
                                    "full_valid_macro_f1 for task=classification)")
    p.add_argument("--direction", choices=["min", "max"], help="default: min for *loss/perplexity, max for *accuracy")
    p.add_argument("--alias", default="champion", help="the alias the gate guards (default: champion)")
    p.add_argument("--checkpoint", default="last", metavar="best|last|N",
                   help="last: each run's final model (default); best: its best kept epoch; N: epoch N")
    p.add_argument("--force", action="store_true",
                   help="move the alias even on other validation data or a worse metric")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    p.set_defaults(func=run)


def run(args) -> int:
    from mlflow.exceptions import MlflowException

    from phitune.errors import PhituneError
    from phitune.models.uri import client_for, tracking_uri
    from phitune.redact import redact_text
    from phitune.registry import store
    from phitune.registry.promote import promote

    try:
        client = client_for(tracking_uri(args.tracking_uri))
        runs, parent = store.select_runs(client, experiment=args.experiment, sweep=args.sweep, run=args.run)
        if args.run and store.run_state(runs[0]) != "finished":
            raise PhituneError(f"run {args.run} is {store.run_state(runs[0])}, not finished: only finished runs are promoted")
        result = promote(client, name=args.name, runs=runs, metric=args.metric, direction=args.direction,
                         alias=args.alias, checkpoint=args.checkpoint, force=args.force,
                         parent_id=parent.info.run_id if parent is not None else None)
    except PhituneError as exc:
        print(f"phitune promote: {exc}", file=sys.stderr)
        return exc.exit_code
    except MlflowException as exc:  # the store: unreachable server, unknown URI scheme, ...
        print(f"phitune promote: tracking store {redact_text(tracking_uri(args.tracking_uri))}: "
              f"{redact_text(str(exc.message).splitlines()[0])[:500]}", file=sys.stderr)
        return 1
    if result.version and not result.refused:
        if result.alias == args.alias:
            print(f"serve it: phitune serve models:/{args.name}@{args.alias}")
        else:
            print(f"compare them on one file: phitune eval models:/{args.name}@{result.alias} --data FILE "
                  f"(and models:/{args.name}@{args.alias}); serving stays on models:/{args.name}@{args.alias}")
    return result.exit_code
