"""Registered models with their versions, aliases and deployments; a guarded delete.

A version (or a model) that a deployment uses cannot be deleted, as on Azure AI
Foundry: the deployment has to go first (`phitune undeploy ID`, which marks the
record deleted in phitune.deployments).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from phitune import deployments
from phitune.errors import PhituneError


@dataclass
class VersionInfo:
    version: str
    aliases: list
    created: str
    run_id: str
    checkpoint: str
    metric: str
    value: Optional[str]
    digest: str
    deployments: list
    status: str


def _when(ms) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def _search_models(client) -> list:
    out, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _versions(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _get_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in _search_models(client))
        raise PhituneError(f"no registered model {name!r}" + (f" (there are: {', '.join(known)})" if known else "")) from None


def _aliases_by_version(model) -> dict:
    out: dict = {}
    for alias, version in (model.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return {k: sorted(v) for k, v in out.items()}


def _dep_text(d: dict) -> str:
    return f"{d['id']} {d.get('target', '?')} {d.get('url') or d.get('endpoint_name') or '-'} ({d.get('status', '?')})"


def list_models(client, tracking_uri: str) -> list[dict]:
    rows = []
    for m in sorted(_search_models(client), key=lambda m: m.name):
        versions = _versions(client, m.name)
        deps = deployments.active_for(m.name, tracking_uri=tracking_uri)
        rows.append({"name": m.name, "versions": len(versions),
                     "latest": versions[-1].version if versions else None,
                     "aliases": {a: str(v) for a, v in sorted((m.aliases or {}).items())},
                     "deployments": [{"id": d["id"], "version": d.get("model_version"), "url": d.get("url"),
                                      "status": d.get("status")} for d in deps],
                     "updated": _when(m.last_updated_timestamp)})
    return rows


def show_model(client, name: str, tracking_uri: str) -> tuple[object, list[VersionInfo]]:
    model = _get_model(client, name)
    by_version = _aliases_by_version(model)
    deps = deployments.active_for(name, tracking_uri=tracking_uri)
    infos = []
    for v in _versions(client, name):
        metric = v.tags.get("phitune.metric", "")
        infos.append(VersionInfo(
            version=str(v.version), aliases=by_version.get(str(v.version), []), created=_when(v.creation_timestamp),
            run_id=v.run_id or "", checkpoint=v.tags.get("phitune.checkpoint", ""), metric=metric,
            value=v.tags.get(f"metric.{metric}") if metric else None, digest=v.tags.get("phitune.valid_digest", ""),
            deployments=[d for d in deps if deployments.serves(d, name, v.version)], status=str(v.status)))
    return model, infos


def parse_target(target: str) -> tuple[str, Optional[str]]:
    """NAME or NAME/VERSION (a registered model name cannot contain '/')."""
    name, sep, version = target.rpartition("/")
    if sep and version.isdigit() and name:
        return name, version
    if "/" in target:
        raise PhituneError(f"{target}: expected NAME or NAME/VERSION (a version number)")
    return target, None


def deployed_message(name: str, version: Optional[str], deps: list) -> str:
    def one(d):
        at = d.get("url") or d.get("endpoint_name") or d.get("target")
        return f"deployment {d['id']} at {at}"

    ids = " ".join(d["id"] for d in deps)
    if version is not None:
        where = "; ".join(one(d) for d in deps)
        first = f"model {name} version {version} is deployed ({where})"
    else:
        where = "; ".join(f"version {d.get('model_version')}: {one(d)}" for d in deps)
        first = f"model {name} is deployed ({where})"
    plural = "s" if len(deps) > 1 else ""
    return f"{first}; delete the deployment{plural} first: phitune undeploy {ids}"


def delete(client, target: str, tracking_uri: str) -> str:
    """Delete NAME/VERSION or the whole model NAME; PhituneError if deployed or unknown."""
    from mlflow.exceptions import MlflowException

    name, version = parse_target(target)
    model = _get_model(client, name)
    deps = deployments.active_for(name, version, tracking_uri=tracking_uri)
    if deps:
        raise PhituneError(deployed_message(name, version, deps))
    if version is None:
        n = len(_versions(client, name))
        client.delete_registered_model(name)
        return f"deleted model {name} ({n} version{'s' if n != 1 else ''})"
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise PhituneError(f"model {name} has no version {version}") from None
    aliases = _aliases_by_version(model).get(str(version), [])
    client.delete_model_version(name, version)
    gone = f" (its alias{'es' if len(aliases) > 1 else ''} {', '.join('@' + a for a in aliases)} went with it)" if aliases else ""
    return f"deleted model {name} version {version}{gone}"
