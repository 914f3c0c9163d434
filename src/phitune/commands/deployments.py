"""`phitune deployments list`: what is served where, and since when; `phitune deployments show ID`:
one deployment's record and a summary of its live /metrics.

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
    show = sub.add_parser("show", help="one deployment: its record and a summary of its server's /metrics")
    show.add_argument("id", metavar="ID", help="a deployment id from `phitune deployments list`")
    show.add_argument("--format", choices=["text", "json"], default="text")
    show.add_argument("--tracking-uri", help="MLflow tracking URI whose deployment records to read "
                                             "(default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    show.set_defaults(func=_show)


def _model(record: dict) -> str:
    held = record.get("models") or []
    if len(held) > 1:  # a server of several models (phitune serve URI URI...): each version it holds
        return ", ".join(f"{m.get('model_name') or m.get('model_uri')}/{m.get('model_version')}"
                         if m.get("model_version") else str(m.get("model_uri")) for m in held)
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


def fetch_metrics(url: str, timeout: float = 10.0) -> str:
    """GET URL/metrics (the endpoint's Prometheus text; no key needed, as for /health)."""
    import urllib.error
    import urllib.request

    from phitune.errors import PhituneError

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as resp:
            return resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PhituneError(f"cannot read {url}/metrics: {reason}") from None


def _show(args) -> int:
    from phitune.deployments import get_deployment
    from phitune.errors import PhituneError
    from phitune.serving.metrics import format_summary, summarize

    record = get_deployment(args.id, args.tracking_uri)
    if record is None:
        print(f"phitune deployments show: no deployment {args.id!r} (see `phitune deployments list --all`)",
              file=sys.stderr)
        return 1
    status = record.get("status") or record.get("state", "?")
    summary, note = None, None
    if record.get("target") != "local":
        note = "an Azure ML deployment: its metrics are in Azure Monitor, not on a phitune /metrics page"
    elif status != "serving":
        note = f"{status}: no live metrics"
    else:
        try:
            summary = summarize(fetch_metrics(record["url"]))
        except PhituneError as exc:
            print(f"phitune deployments show: {exc}", file=sys.stderr)
            return 1
    if args.format == "json":
        print(json.dumps({"deployment": record, "metrics": summary, "note": note}, indent=2, sort_keys=True))
        return 0
    print(f"deployment     {record['id']}: {_model(record)} ({record.get('target', '?')}, {status})")
    print(f"url            {record.get('url') or record.get('endpoint_name') or '-'}")
    print(f"since          {record.get('created_at', '-')}")
    print(f"content filter {record.get('content_filter') or '-'}")
    print(note if summary is None else format_summary(summary))
    return 0
