"""`phitune models list | show NAME | delete NAME[/VERSION]`: the MLflow model registry,
with each version's aliases and deployments.

`delete` refuses a version (or a model) that an active deployment uses, as Azure AI
Foundry does: delete the deployment first (`phitune undeploy ID`). Exit 0 on success,
1 for an unknown model/version or a refused delete.
"""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    uri_help = "default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db"
    # --tracking-uri before or after the subcommand; SUPPRESS keeps a subcommand's
    # default from overwriting a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=uri_help)
    p = subparsers.add_parser("models", help="registered models: versions, aliases, deployments; delete (guarded)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", help=uri_help)
    sub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    ls = sub.add_parser("list", help="registered models with aliases and deployments", parents=[common])
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(models_func=_list)
    show = sub.add_parser("show", help="one model's versions: aliases, run, metric, data digest, deployments",
                          parents=[common])
    show.add_argument("name", metavar="NAME")
    show.add_argument("--format", choices=["table", "json"], default="table")
    show.set_defaults(models_func=_show)
    rm = sub.add_parser("delete", help="delete a version (NAME/VERSION) or a whole model (NAME); refused while deployed",
                        parents=[common])
    rm.add_argument("target", metavar="NAME[/VERSION]")
    rm.set_defaults(models_func=_delete)

    def dispatch(args) -> int:
        if not getattr(args, "models_func", None):
            p.print_help()
            return 2
        from phitune.errors import PhituneError
        from phitune.models.uri import client_for, tracking_uri

        uri = tracking_uri(args.tracking_uri)
        try:
            return args.models_func(client_for(uri), uri, args)
        except PhituneError as exc:
            print(f"phitune models {args.models_command}: {exc}", file=sys.stderr)
            return exc.exit_code

    p.set_defaults(func=dispatch)


def _table(header: list, rows: list) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _list(client, uri, args) -> int:
    from phitune.registry.models import list_models

    rows = list_models(client, uri)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no registered models (phitune promote --name NAME registers one)")
        return 0
    body = [[r["name"], r["versions"], r["latest"] or "-",
             " ".join(f"@{a}={v}" for a, v in r["aliases"].items()) or "-",
             ", ".join(f"v{d['version']}: {d['id']} {d['url'] or ''} ({d['status']})".replace(" ()", "")
                       for d in r["deployments"]) or "-", r["updated"]] for r in rows]
    print(_table(["name", "versions", "latest", "aliases", "deployments", "updated"], body))
    return 0


def _show(client, uri, args) -> int:
    from phitune.registry.models import _dep_text, show_model

    model, versions = show_model(client, args.name, uri)
    if args.format == "json":
        print(json.dumps({"name": model.name, "description": model.description,
                          "aliases": {a: str(v) for a, v in (model.aliases or {}).items()},
                          "versions": [vars(v) for v in versions]}, indent=2, default=str))
        return 0
    print(f"{model.name}: {len(versions)} version(s)"
          + (f"; aliases {' '.join(f'@{a}={v}' for a, v in sorted((model.aliases or {}).items()))}" if model.aliases else ""))
    if model.description:
        print(f"  {model.description}")
    body = [[v.version, " ".join("@" + a for a in v.aliases) or "-", v.created, v.run_id[:12] or "-",
             v.checkpoint or "-", f"{v.metric} {float(v.value):.4g}" if v.value else "-", v.digest[:12] or "-",
             "; ".join(_dep_text(d) for d in v.deployments) or "-"] for v in versions]
    print(_table(["version", "aliases", "created", "run", "checkpoint", "metric", "valid digest", "deployments"], body))
    return 0


def _delete(client, uri, args) -> int:
    from phitune.registry.models import delete

    print(delete(client, args.target, uri))
    return 0
