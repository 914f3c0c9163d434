"""Deployment records, kept next to the registry: what is served where, since when.

One JSON file per deployment in `<mlruns>/deployments/<id>.json` (the folder of the
sqlite tracking db; `PHITUNE_DEPLOYMENTS_DIR` overrides). A deployment counts as
deployed from `phitune serve` / `phitune deploy` until `phitune undeploy`, as on
Azure AI Foundry, where a model can't be deleted while a deployment uses it. A local
server counts only while its process runs: one that died (killed, crashed, machine
restarted) is shown as `stopped` and no longer keeps its model version; a pid that
now belongs to another process (same pid, other start time) is not the server. A
server recorded on another host cannot be checked from here and still counts.

Record keys: id, model_name, model_version, model_uri, target ("local"|"azureml"),
url, pid (local), endpoint_name / deployment_name (azureml), created_at (ISO 8601
UTC), state ("active"|"deleted"), plus deleted_at once undeployed.

A server of several models (`phitune serve URI URI...`, `--registered NAME`) also
keeps `models`: one entry per loaded version ({model_name, model_version, model_uri,
resolved_uri, run_id, served_model}); the top-level model fields are its first one.
`phitune serve --follow` rewrites that list as aliases move (`update_models`): a
version is listed from before it is downloaded until after it is unloaded, so the
registry's delete guard covers every version the server holds.
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path

def deployments_dir(tracking_uri: str | None = None) -> Path:
    env = os.environ.get("PHITUNE_DEPLOYMENTS_DIR")
    if env:
        return Path(env)
    from phitune.models.uri import tracking_uri as resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "deployments"
    return Path("mlruns") / "deployments"


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, path)  # readers never see half a record


def record_deployment(model_uri: str, model_name: str | None, model_version: str | None, target: str, url: str,
                      tracking_uri: str | None = None, pid: int | None = None, **extra) -> dict:
    folder = deployments_dir(tracking_uri)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"id": uuid.uuid4().hex[:12], "model_uri": model_uri, "model_name": model_name,
              "model_version": None if model_version is None else str(model_version), "target": target, "url": url,
              "pid": pid, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "state": "active",
              **extra}
    _write(folder / f"{record['id']}.json", record)
    return record


def update_models(dep_id: str, models: list[dict], tracking_uri: str | None = None) -> dict | None:
    """Replace a record's `models` (and its top-level model fields, from the first); None,
    and nothing written, when the record is gone or undeployed (undeploy wins)."""
    path = deployments_dir(tracking_uri) / f"{dep_id}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("state") != "active" or not models:
        return None
    first = models[0]
    record.update(models=models, model_name=first.get("model_name"), model_version=first.get("model_version"),
                  resolved_uri=first.get("resolved_uri"), run_id=first.get("run_id"))
    _write(path, record)
    return record


def serves(record: dict, model_name: str, version: str | None = None) -> bool:
    """Whether a record holds `model_name` (any version, or `version`): its `models` list
    when it has one, else its top-level fields."""
    held = record.get("models") or [record]
    return any(m.get("model_name") == model_name and (version is None or str(m.get("model_version")) == str(version))
               for m in held)


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serving(record: dict) -> bool:
    """Whether a local record's server process still runs (as far as this machine can tell)."""
    host = record.get("host")
    if host and host != socket.gethostname():
        return True  # another machine's pid: not ours to check
    pid = record.get("pid")
    if not _alive(pid):
        return False
    started = record.get("pid_started")
    if started:
        from phitune.serving.server import process_start_time

        now = process_start_time(int(pid))
        if now is not None and now != started:
            return False  # the server exited and its pid was reused by a later process
    return True


def list_deployments(tracking_uri: str | None = None, include_deleted: bool = False) -> list[dict]:
    folder = deployments_dir(tracking_uri)
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("state") == "deleted" and not include_deleted:
            continue
        if record.get("target") == "local" and record.get("state") == "active":
            record["running"] = _serving(record)
            record["status"] = "serving" if record["running"] else "stopped"
        else:
            record["status"] = record.get("state")
        out.append(record)
    return sorted(out, key=lambda r: r.get("created_at", ""))


def get_deployment(dep_id: str, tracking_uri: str | None = None) -> dict | None:
    for record in list_deployments(tracking_uri, include_deleted=True):
        if record["id"] == dep_id:
            return record
    return None


def mark_deleted(dep_id: str, tracking_uri: str | None = None) -> dict:
    path = deployments_dir(tracking_uri) / f"{dep_id}.json"
    record = json.loads(path.read_text())
    record.update(state="deleted", deleted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _write(path, record)
    return record


def active_for(model_name: str, version: str | None = None, tracking_uri: str | None = None) -> list[dict]:
    """Deployments that keep `model_name` (or one version of it) from being deleted: Azure
    ones until undeployed, local ones while their server runs."""
    return [r for r in list_deployments(tracking_uri) if serves(r, model_name, version) and r.get("running", True)]
