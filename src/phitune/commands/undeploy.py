"""`phitune undeploy ID`: stop a deployment and mark its record deleted.

Local: SIGTERM to the server's process if it still runs (and is the same process
that was recorded: same host, same start time), then wait for it to exit.
Azure ML: phitune.azure.endpoint.undeploy_azure deletes the online deployment.
Once undeployed, the model version no longer counts as deployed for the registry.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time

from phitune.errors import PhituneError


def register(subparsers) -> None:
    p = subparsers.add_parser("undeploy", help="stop a deployment and mark it deleted", description=__doc__.splitlines()[0])
    p.add_argument("id", metavar="ID", help="deployment id (phitune deployments list)")
    p.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                   help="how long a local server gets to stop after SIGTERM before SIGKILL (default: 20)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI whose deployment records to use")
    p.set_defaults(func=_undeploy)


def _state(pid: int) -> str | None:
    """The process state letter from /proc (Z = zombie: exited, not yet reaped); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"


def _running(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def stop_local(record: dict, timeout: float) -> str:
    """Stop a recorded local server; returns what happened, in words."""
    from phitune.serving.server import process_start_time

    pid = record.get("pid")
    if not pid or not _running(int(pid)):
        return "the server was not running"
    pid = int(pid)
    host = record.get("host")
    if host and host != socket.gethostname():
        raise PhituneError(f"deployment {record['id']} runs on host {host}, not here ({socket.gethostname()}); "
                           "run `phitune undeploy` there")
    started = record.get("pid_started")
    if started and process_start_time(pid) not in (None, started):
        return f"the server was not running (pid {pid} now belongs to another process)"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "the server was not running"
    except PermissionError:
        raise PhituneError(f"not allowed to stop pid {pid} (another user's process)") from None
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return f"stopped the server (pid {pid}) with SIGKILL after {timeout:g} s"
        time.sleep(0.05)
    return f"stopped the server (pid {pid})"


def _undeploy(args) -> int:
    from phitune.deployments import get_deployment, mark_deleted

    record = get_deployment(args.id, args.tracking_uri)
    if record is None:
        print(f"phitune undeploy: no deployment {args.id!r} (phitune deployments list --all)", file=sys.stderr)
        return 1
    if record.get("state") == "deleted":
        print(f"deployment {args.id} was already undeployed at {record.get('deleted_at', '?')}")
        return 0
    try:
        target = record.get("target")
        if target == "local":
            what = stop_local(record, args.timeout)
        elif target == "azureml":
            try:
                from phitune.azure.endpoint import undeploy_azure
            except ImportError as exc:
                raise PhituneError(f"deployment {args.id} is on Azure ML, and phitune's Azure support is not "
                                   f"available here ({exc}); pip install 'phitune[azure]'") from None
            result = undeploy_azure(record)
            what = result if isinstance(result, str) and result else \
                f"deleted Azure ML deployment {record.get('deployment_name') or ''} of {record.get('endpoint_name') or '?'}".strip()
        else:
            raise PhituneError(f"deployment {args.id}: unknown target {target!r}")
    except PhituneError as exc:
        print(f"phitune undeploy: {exc}", file=sys.stderr)
        return exc.exit_code
    mark_deleted(args.id, args.tracking_uri)
    version = f" version {record['model_version']}" if record.get("model_version") else ""
    print(f"undeployed {args.id} ({record.get('model_name') or record.get('model_uri')}{version}): {what}")
    return 0
