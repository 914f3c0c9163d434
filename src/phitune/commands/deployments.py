"""`phitune deployments list`: what is served where, and since when.

A local server that exited shows as `stopped`; only a running one (and an Azure ML
deployment, until `phitune undeploy ID`) keeps the registry from deleting its model version.
"""
from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("deployments", help="list model deployments (local servers and Azure endpoints)",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="deployments_command", metavar="SUBCOMMAND")
    ls = sub.add_parser("list", help="list deployments (the default)")
    for parser in (p, ls):
        parser.add_argument("--all", action="store_true", help="include undeployed (deleted) ones")
        parser.add_argument("--format", choices=["table", "json"], default="table")
        parser.add_argument("--tracking-uri", help="MLflow tracking URI whose deployment records to read "
                                                   "(default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.set_defaults(func=_list)
    ls.set_defaults(func=_list)


def _model(record: dict) -> str:
    name = record.get("model_name") or record.get("served_model") or record.get("model_uri") or "?"
    version = record.get("model_version")
    return f"{name}/{version}" if version else name


def format_table(records: list) -> str:
    header = ("ID", "MODEL", "TARGET", "STATUS", "URL", "SINCE")
    rows = [(r.get("id", "?"), _model(r), r.get("target", "?"), r.get("status") or r.get("state", "?"),
             r.get("url") or r.get("endpoint_name") or "", r.get("created_at", "")) for r in records]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows))


def _list(args) -> int:
    from phitune.deployments import deployments_dir, list_deployments

    records = list_deployments(args.tracking_uri, include_deleted=args.all)
    if args.format == "json":
        print(json.dumps(records, indent=2, sort_keys=True))
    elif not records:
        print(f"no deployments (records in {deployments_dir(args.tracking_uri)})", file=sys.stderr)
    else:
        print(format_table(records))
    return 0
