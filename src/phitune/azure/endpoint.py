"""`phitune deploy MODEL_URI --target azureml`: a managed online endpoint for a registered model.

    phitune deploy models:/support-bot@champion --target azureml                 # create, deploy, route 100%
    phitune deploy models:/support-bot/3 --target azureml --dry-run            # endpoint.yaml + deployment.yaml
    phitune deploy models:/support-bot/3 --target azureml --instance-type Standard_NC6s_v3 --instance-count 2

The model: a version of the local MLflow registry. One linked from a Foundry
fine-tuning job (tag `azure_model_id`) is already in the workspace and deployed
by that id; any other is uploaded from its MLflow model folder as an
`mlflow_model` (Azure ML serves MLflow models without a scoring script or
environment: "no-code deployment"). Also accepted: azureml:NAME:VERSION, an
azureml:// model URI, or a local MLflow model folder.

The endpoint uses key auth (auth_mode=key). The key is never printed, logged or
written: read it with `az ml online-endpoint get-credentials -n NAME`.

A real deployment writes a deployment record (phitune.deployments, target
"azureml") so `phitune deployments` lists it, the registry refuses to delete
the model while it is deployed, and `phitune undeploy ID` calls
`undeploy_azure(record)`, which deletes the endpoint (or only the deployment
when the endpoint existed before phitune deployed to it).
"""
from __future__ import annotations

import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from phitune.errors import PhituneError

DEFAULT_INSTANCE_TYPE = "Standard_NC6s_v3"  # 1x V100 16 GB: the catalog's smallest GPU SKU for Phi-3-mini
DEFAULT_DEPLOYMENT = "blue"


@dataclass
class AzureModelRef:
    """What the online deployment serves: a workspace model id, or a local MLflow folder to upload."""

    model_uri: str  # as the user gave it
    model_name: Optional[str]
    model_version: Optional[str]
    azure_id: Optional[str] = None  # azureml:NAME:VERSION / ARM id / azureml:// URI
    local_dir: Optional[str] = None  # MLflow model folder (MLmodel file) to upload


def _sanitize(name: str, limit: int) -> str:
    name = re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-") or "phitune"
    if not name[0].isalpha():
        name = "m-" + name
    return name[:limit].rstrip("-")


def default_endpoint_name(model_name: Optional[str]) -> str:
    # Endpoint names are unique per Azure region: 3-32 characters, letters, digits and '-'.
    return f"{_sanitize(model_name or 'phitune', 25)}-{secrets.token_hex(3)}"


def resolve_model(model_uri: str, tracking_uri: Optional[str] = None, download_dir: Optional[str] = None) -> AzureModelRef:
    """Where the deployment's model comes from; PhituneError with the reason when it cannot."""
    uri = str(model_uri).strip()
    if uri.startswith("azureml:"):
        m = re.match(r"^azureml:([^:/]+):([^:/]+)$", uri)
        return AzureModelRef(uri, m.group(1) if m else None, m.group(2) if m else None, azure_id=uri)
    if Path(uri).is_dir():
        if not (Path(uri) / "MLmodel").is_file():
            raise PhituneError(f"{uri}: not an MLflow model folder (no MLmodel file)")
        return AzureModelRef(uri, None, None, local_dir=str(Path(uri).resolve()))
    from phitune.models.uri import client_for, download, registered_version, tracking_uri as default_uri

    found = registered_version(uri, client_for(default_uri(tracking_uri))) if uri.startswith("models:/") else None
    if found is None:
        raise PhituneError(f"{uri}: expected azureml:NAME:VERSION, models:/NAME@ALIAS, models:/NAME/VERSION "
                           "or an MLflow model folder")
    name, mv = found
    tags = dict(mv.tags or {})
    if tags.get("azure_model_id"):
        return AzureModelRef(uri, name, str(mv.version), azure_id=tags["azure_model_id"])
    dst = Path(download_dir or Path("outputs") / "azure" / "deploy" / f"{name}-v{mv.version}")
    local = download(f"models:/{name}/{mv.version}", dst)
    if not (Path(local) / "MLmodel").is_file():
        raise PhituneError(f"{uri}: version {mv.version} is not an MLflow model (no MLmodel file at {mv.source})")
    return AzureModelRef(uri, name, str(mv.version), local_dir=str(Path(local).resolve()))


def build_endpoint(endpoint_name: str, ref: AzureModelRef, tags: Optional[dict] = None):
    from azure.ai.ml.entities import ManagedOnlineEndpoint

    return ManagedOnlineEndpoint(name=endpoint_name, auth_mode="key",
                                 description=f"phitune: {ref.model_uri}",
                                 tags={"phitune.model_uri": ref.model_uri, **(tags or {})})


def build_deployment(endpoint_name: str, ref: AzureModelRef, instance_type: str = DEFAULT_INSTANCE_TYPE,
                     instance_count: int = 1, deployment_name: str = DEFAULT_DEPLOYMENT):
    from azure.ai.ml.entities import ManagedOnlineDeployment, Model

    if instance_count < 1:
        raise PhituneError("--instance-count must be at least 1")
    if ref.azure_id:
        model = ref.azure_id
    else:
        model = Model(path=ref.local_dir, type="mlflow_model", name=_sanitize(ref.model_name or "phitune-model", 255),
                      version=ref.model_version, description=f"phitune: {ref.model_uri}")
    return ManagedOnlineDeployment(name=deployment_name, endpoint_name=endpoint_name, model=model,
                                   instance_type=instance_type, instance_count=instance_count)


def write_yaml(entity, path: Path) -> Path:
    from phitune.azure.command_job import _relativize_paths
    from phitune.azure.redact import assert_clean_file

    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    result = entity.dump(path)
    if not path.exists():
        # azure-ai-ml 1.x: ManagedOnlineEndpoint.dump() ignores `dest` and returns the dict.
        import json

        plain = json.loads(json.dumps(result, default=str))  # OrderedDicts -> dicts for safe_dump
        path.write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")
    _relativize_paths(path)
    assert_clean_file(path)
    return path


def _client_for(settings=None, azure: Optional[dict] = None, credential=None, transport=None):
    from phitune.azure.settings import AzureMLBackend
    from phitune.azure.workspace import ml_client

    if settings is None:
        azure = azure or {}
        settings = AzureMLBackend(subscription_id=azure.get("subscription_id"),
                                  resource_group=azure.get("resource_group"), workspace=azure.get("workspace"))
    return ml_client(settings, credential=credential, transport=transport)


def deploy_azure(model_uri: str, settings, *, instance_type: Optional[str] = None, instance_count: int = 1,
                 endpoint_name: Optional[str] = None, deployment_name: str = DEFAULT_DEPLOYMENT, dry_run: bool = False,
                 output_dir: str = "outputs/azure/deploy", tracking_uri: Optional[str] = None, credential=None,
                 transport=None) -> Optional[dict]:
    """Create (or reuse) the endpoint, deploy the model, route all traffic to it, record it.

    Returns the deployment record, or None on a dry run (YAML written, nothing sent).
    """
    from phitune.azure.redact import install_log_filter
    from phitune.azure.workspace import require_sdk

    require_sdk()
    install_log_filter()
    ref = resolve_model(model_uri, tracking_uri, download_dir=str(Path(output_dir) / "model"))
    name = endpoint_name or default_endpoint_name(ref.model_name)
    endpoint = build_endpoint(name, ref)
    deployment = build_deployment(name, ref, instance_type or DEFAULT_INSTANCE_TYPE, instance_count, deployment_name)
    if dry_run:
        out = Path(output_dir)
        e = write_yaml(endpoint, out / "endpoint.yaml")
        d = write_yaml(deployment, out / "deployment.yaml")
        print(f"dry run: wrote {e} and {d}; nothing was submitted\n"
              f"  az ml online-endpoint create -f {e}\n  az ml online-deployment create -f {d} --all-traffic")
        return None

    from phitune.azure.workspace import azure_errors

    with azure_errors(f"deploy {model_uri} to Azure ML"):
        return _deploy(client=_client_for(settings, credential=credential, transport=transport), ref=ref, name=name,
                       endpoint=endpoint, deployment=deployment, deployment_name=deployment_name,
                       instance_count=instance_count, settings=settings, tracking_uri=tracking_uri)


def _deploy(client, ref, name, endpoint, deployment, deployment_name, instance_count, settings, tracking_uri) -> dict:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        client.online_endpoints.get(name)
        created = False
        print(f"endpoint {name} exists; adding deployment {deployment_name} to it", file=sys.stderr)
    except ResourceNotFoundError:
        print(f"creating endpoint {name} (auth: key)", file=sys.stderr)
        client.online_endpoints.begin_create_or_update(endpoint).result()
        created = True
    what = ref.azure_id or f"{ref.local_dir} (uploaded as an mlflow_model)"
    print(f"deploying {what} to {name}/{deployment_name} on {instance_count} x {deployment.instance_type}", file=sys.stderr)
    client.online_deployments.begin_create_or_update(deployment).result()
    endpoint.traffic = {deployment_name: 100}
    live = client.online_endpoints.begin_create_or_update(endpoint).result()
    url = getattr(live, "scoring_uri", None) or client.online_endpoints.get(name).scoring_uri
    record = _record(ref, url, name, deployment_name, settings, created, tracking_uri)
    print(f"deployed {ref.model_uri} to Azure ML endpoint {name}: {url}\n"
          f"  key: az ml online-endpoint get-credentials -n {name} -g {settings.resource_group} -w {settings.workspace}\n"
          f"  deployment id: {record['id']} (phitune undeploy {record['id']})")
    return record


def _record(ref: AzureModelRef, url: str, endpoint_name: str, deployment_name: str, settings, endpoint_created: bool,
            tracking_uri: Optional[str]) -> dict:
    from phitune.deployments import record_deployment

    # Workspace identifiers (not secrets) so that `phitune undeploy` can reach the endpoint later.
    azure = {"subscription_id": settings.subscription_id, "resource_group": settings.resource_group,
             "workspace": settings.workspace, "endpoint_created": endpoint_created}
    return record_deployment(ref.model_uri, ref.model_name, ref.model_version, "azureml", url, tracking_uri=tracking_uri,
                             endpoint_name=endpoint_name, deployment_name=deployment_name, azure=azure)


def undeploy_azure(record: dict, *, credential=None, transport=None, settings=None) -> str:
    """Delete what `phitune deploy --target azureml` created; returns what happened, in words.

    The endpoint (and with it its deployments) when phitune created it, else only
    this deployment. Workspace from the record's `azure` block, else `settings`
    (an AzureMLBackend), else AZURE_SUBSCRIPTION_ID / AZURE_RESOURCE_GROUP /
    AZUREML_WORKSPACE_NAME. The caller marks the record deleted.
    """
    import os

    from phitune.azure.workspace import require_sdk

    require_sdk()
    endpoint = record.get("endpoint_name")
    deployment = record.get("deployment_name")
    if not endpoint:
        raise PhituneError(f"deployment {record.get('id')}: the record has no endpoint_name")
    azure = dict(record.get("azure") or {})
    if settings is None:
        azure.setdefault("subscription_id", os.environ.get("AZURE_SUBSCRIPTION_ID"))
        azure.setdefault("resource_group", os.environ.get("AZURE_RESOURCE_GROUP"))
        azure.setdefault("workspace", os.environ.get("AZUREML_WORKSPACE_NAME"))
    from phitune.azure.workspace import azure_errors

    with azure_errors(f"undeploy {endpoint}"):
        client = _client_for(settings, azure=azure, credential=credential, transport=transport)
        return _delete(client, endpoint, deployment, azure)


def _delete(client, endpoint: str, deployment: Optional[str], azure: dict) -> str:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        if azure.get("endpoint_created", True) or not deployment:
            client.online_endpoints.begin_delete(name=endpoint).result()
            return f"deleted Azure ML endpoint {endpoint} and its deployments"
        client.online_deployments.begin_delete(name=deployment, endpoint_name=endpoint).result()
        return f"deleted Azure ML deployment {deployment} of endpoint {endpoint} (the endpoint predates phitune's deploy)"
    except ResourceNotFoundError:
        return f"Azure ML endpoint {endpoint} was already gone"
