"""`phitune sweep dashboard [--sweep latest|PARENT_RUN_ID]`: optuna-dashboard on a sweep's study.

The sweep's MLflow parent run names its study and storage (params `study_name`,
`storage`); the dashboard serves that storage on 127.0.0.1 at a free port (printed)
until Ctrl-C. Each trial carries its MLflow run id as the user attribute
`mlflow_run_id`, and the MLflow UI's run URL is printed, so the two views link.
Exit 1 when the sweep, its storage or optuna-dashboard is missing.
"""
from __future__ import annotations

import socket
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="a sweep's tools: dashboard (optuna-dashboard on its study)",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="sweep_command", metavar="SUBCOMMAND")
    d = sub.add_parser("dashboard", help="optuna-dashboard on a sweep's study storage (127.0.0.1, a free port)",
                       description=__doc__.splitlines()[0])
    d.add_argument("--sweep", default="latest", metavar="latest|PARENT_RUN_ID",
                   help="the sweep: its MLflow parent run id, or latest (default)")
    d.add_argument("--experiment", help="for --sweep latest: the MLflow experiment (default: phitune)")
    d.add_argument("--storage", metavar="URL",
                   help="the study's storage, when the parent's `storage` param is masked (a password) or moved")
    d.add_argument("--port", type=int, default=0, help="default: a free port")
    d.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    d.set_defaults(func=run_dashboard)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _storage_url(parent, explicit) -> str:
    from pathlib import Path

    from phitune.errors import PhituneError
    from phitune.redact import MASK

    url = explicit or parent.data.params.get("storage")
    if not url:
        raise PhituneError(f"sweep {parent.info.run_id}: its parent run has no `storage` param; pass --storage URL")
    if MASK in url:
        raise PhituneError(f"sweep {parent.info.run_id}: its storage URL has a masked password ({url}); "
                           "pass --storage URL")
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise PhituneError(f"sweep {parent.info.run_id}: no study database at {url[len('sqlite:///'):]} "
                           "(relative to the folder the sweep ran in); pass --storage URL")
    return url


def run_dashboard(args) -> int:
    from mlflow.exceptions import MlflowException

    from phitune.errors import PhituneError
    from phitune.models.uri import client_for, tracking_uri
    from phitune.redact import redact_text
    from phitune.registry import store

    try:
        client = client_for(tracking_uri(args.tracking_uri))
        parent = store.resolve_sweep(client, args.sweep, args.experiment)
        study_name = parent.data.params.get("study_name") or parent.data.tags.get("phitune.study")
        url = _storage_url(parent, args.storage)
        try:
            import optuna_dashboard
        except ImportError:
            raise PhituneError("optuna-dashboard is not installed: pip install 'phitune[dashboard]'") from None
        from phitune.sweep.study import open_storage

        storage = open_storage(url)
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            raise PhituneError(f"no study {study_name!r} in {redact_text(url)}") from None
    except PhituneError as exc:
        print(f"phitune sweep dashboard: {exc}", file=sys.stderr)
        return exc.exit_code
    except MlflowException as exc:
        print(f"phitune sweep dashboard: tracking store {redact_text(tracking_uri(args.tracking_uri))}: "
              f"{redact_text(str(exc.message).splitlines()[0])[:500]}", file=sys.stderr)
        return 1
    from phitune.tracking.experiment import ui_url

    port = args.port or free_port()
    print(f"optuna-dashboard for study {study_name} ({redact_text(url)}):\n"
          f"  http://127.0.0.1:{port}/dashboard/studies/{study_id}\n"
          f"  each trial's MLflow run id is its user attribute mlflow_run_id; the sweep in MLflow: "
          f"{ui_url(parent.info.experiment_id, parent.info.run_id)}\n"
          "  Ctrl-C stops it", flush=True)
    optuna_dashboard.run_server(storage, host="127.0.0.1", port=port)
    return 0
