"""A recording azure-core transport: MLClient talks to it instead of Azure.

Every request MLClient would send is recorded (method, URL, headers, JSON body)
and answered from canned routes; nothing leaves the process. The responses are
built as real `requests.Response` objects wrapped in azure-core's own
RequestsTransportResponse / RestRequestsTransportResponse, so the SDK's
pipeline (deserialisation, LRO polling, error mapping) runs exactly as it would
against the service.
"""
from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qs, urlparse

import warnings

import requests

with warnings.catch_warnings():
    # azure-ai-ml's marshmallow schemas warn about marshmallow 4 when their modules are first
    # imported (lazily, mid-test); import them all once here, quietly. Not phitune's to fix.
    import importlib
    import pkgutil

    warnings.simplefilter("ignore")
    import azure.ai.ml._schema as _schema

    for _mod in pkgutil.walk_packages(_schema.__path__, _schema.__name__ + "."):
        importlib.import_module(_mod.name)

from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import HttpTransport, RequestsTransportResponse
from azure.core.rest._requests_basic import RestRequestsTransportResponse

try:  # azure-core >= 1.30 keeps it here
    from azure.core.pipeline._tools import is_rest
except ImportError:  # pragma: no cover
    from azure.core.pipeline.transport._requests_basic import _is_rest as is_rest

SUB = "00000000-1111-2222-3333-444444444444"
RG = "rg-phitune"
WS = "ws-phitune"
ARM = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.MachineLearningServices/workspaces/{WS}"


class FakeCredential:
    """A TokenCredential that never talks to Entra ID (tests must not use DefaultAzureCredential)."""

    TOKEN = "fake-arm-token-for-tests"

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        return AccessToken(self.TOKEN, int(time.time()) + 3600)

    def get_token_info(self, *scopes, **kwargs):
        from azure.core.credentials import AccessTokenInfo

        return AccessTokenInfo(self.TOKEN, int(time.time()) + 3600)


@dataclass
class Recorded:
    method: str
    url: str
    headers: dict
    body: Any  # parsed JSON, or the raw text/bytes when not JSON, or None

    @property
    def path(self) -> str:
        return urlparse(self.url).path

    @property
    def query(self) -> dict:
        return {k: v[0] for k, v in parse_qs(urlparse(self.url).query).items()}

    @property
    def host(self) -> str:
        return urlparse(self.url).netloc


Answer = Union[dict, list, tuple, Callable[["Recorded"], Any], None]


@dataclass
class Route:
    method: str
    pattern: re.Pattern
    answer: Answer  # JSON body (200), (status, body[, headers]), or a callable of the request
    hits: int = 0


@dataclass
class RecordingTransport(HttpTransport):
    """Records requests; answers the first route whose method and URL regex match, else 404."""

    routes: list = field(default_factory=list)
    requests: list = field(default_factory=list)

    # -- set-up ---------------------------------------------------------------------
    def on(self, method: str, url_regex: str, answer: Answer) -> "RecordingTransport":
        self.routes.append(Route(method.upper(), re.compile(url_regex), answer))
        return self

    # -- HttpTransport ----------------------------------------------------------------
    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        pass

    def sleep(self, duration: float) -> None:  # LRO polling: no real waiting in tests
        pass

    def send(self, request, **kwargs):
        raw = request.content if is_rest(request) else request.data
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8", "replace")
        body: Any = raw
        if isinstance(raw, str) and raw:
            try:
                body = json.loads(raw)
            except ValueError:
                pass
        rec = Recorded(request.method.upper(), request.url, dict(request.headers), body)
        self.requests.append(rec)

        status, payload, headers = 404, {"error": {"code": "NotFound", "message": f"no canned answer for {rec.method} {rec.path}"}}, {}
        for route in self.routes:
            if route.method == rec.method and route.pattern.search(rec.url):
                route.hits += 1
                answer = route.answer(rec) if callable(route.answer) else route.answer
                if isinstance(answer, tuple):
                    status, payload = answer[0], answer[1]
                    headers = answer[2] if len(answer) > 2 else {}
                else:
                    status, payload = 200, answer
                break
        return self._response(request, status, payload, headers)

    @staticmethod
    def _response(request, status: int, payload, headers: dict):
        resp = requests.Response()
        resp.status_code = status
        resp.reason = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 404: "Not Found"}.get(status, "")
        data = b"" if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        resp.raw = io.BytesIO(data)  # streamed like a socket, so azure-core's download path runs
        resp.headers.update({"Content-Type": "application/json", "x-ms-request-id": "rec-0001", **headers})
        resp.url = request.url
        if is_rest(request):
            out = RestRequestsTransportResponse(request=request, internal_response=resp)
            out.read()
            return out
        return RequestsTransportResponse(request, resp)

    # -- assertions helpers ----------------------------------------------------------------
    def sent(self, method: Optional[str] = None, path_regex: str = "") -> list:
        rx = re.compile(path_regex)
        return [r for r in self.requests if (method is None or r.method == method.upper()) and rx.search(r.path)]

    def dump(self) -> str:
        """Everything recorded as text (for the canary-secret scan)."""
        return "\n".join(f"{r.method} {r.url}\n{json.dumps(r.headers, default=str)}\n{json.dumps(r.body, default=str)}"
                         for r in self.requests)


# -- canned ARM bodies ------------------------------------------------------------------------------

def echo_job(rec: Recorded, status: str = "NotStarted") -> dict:
    """Answer a job PUT with what was sent plus the fields the service adds (id, status, studio link)."""
    name = rec.path.rstrip("/").split("/")[-1]
    props = dict(rec.body["properties"]) if isinstance(rec.body, dict) else {}
    props["status"] = status
    props.setdefault("services", {})
    props["services"] = {**(props.get("services") or {}),
                         "Studio": {"jobServiceType": "Studio",
                                    "endpoint": f"https://ml.azure.com/runs/{name}?wsid={ARM}"}}
    return {"id": f"{ARM}/jobs/{name}", "name": name, "type": "Microsoft.MachineLearningServices/workspaces/jobs",
            "properties": props, "systemData": {"createdAt": "2025-01-01T00:00:00Z"}}


def code_version(name: str = "phitune-code", version: str = "1") -> dict:
    return {"id": f"{ARM}/codes/{name}/versions/{version}", "name": version,
            "type": "Microsoft.MachineLearningServices/workspaces/codes/versions",
            "properties": {"codeUri": f"https://stphitune.blob.core.windows.net/code/{name}", "isAnonymous": True,
                           "properties": {}, "tags": {}}}


def echo_versioned(rec: Recorded) -> dict:
    """Answer an asset-version PUT (environment, code, data, model) with what was sent plus its id."""
    parts = rec.path.rstrip("/").split("/")
    props = dict(rec.body.get("properties", {})) if isinstance(rec.body, dict) else {}
    if parts[-4] == "models":
        props["flavors"] = props.get("flavors") or {}
    return {"id": rec.path, "name": parts[-1], "type": "Microsoft.MachineLearningServices/workspaces/" + parts[-4] + "/versions",
            "properties": props, "systemData": {"createdAt": "2025-01-01T00:00:00Z"}}


# -- workspace set-ups ------------------------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
FAKE_ACCOUNT_KEY = "ZmFrZS1zdG9yYWdlLWFjY291bnQta2V5LWZvci10ZXN0cw=="  # base64, what listSecrets returns


def datastore() -> dict:
    return {"id": f"{ARM}/datastores/workspaceblobstore", "name": "workspaceblobstore",
            "properties": {"datastoreType": "AzureBlob", "accountName": "stphitune",
                           "containerName": "azureml-blobstore-0001", "endpoint": "core.windows.net",
                           "protocol": "https", "credentials": {"credentialsType": "AccountKey"}, "isDefault": True}}


def add_storage_routes(t: RecordingTransport) -> RecordingTransport:
    """The default blob datastore, its (fake) account key, and a blob container that accepts uploads."""
    t.on("GET", r"/datastores/workspaceblobstore\?", datastore())
    t.on("POST", r"/datastores/workspaceblobstore/listSecrets", {"secretsType": "AccountKey", "key": FAKE_ACCOUNT_KEY})
    t.on("PUT", r"blob\.core\.windows\.net/.*comp=metadata",
         (200, None, {"ETag": '"0x2"', "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"}))
    t.on("PUT", r"blob\.core\.windows\.net/", (201, None, {"ETag": '"0x1"', "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"}))
    t.on("PUT", r"/data/[^/]+/versions/", echo_versioned)
    return t


def route_blob_storage(monkeypatch, t: RecordingTransport) -> None:
    """Send azure-ai-ml's blob uploads through `t` too.

    azure-ai-ml builds its BlobServiceClient without forwarding MLClient's
    transport, so this (test-only) wraps that one constructor to add it; the
    upload logic itself (hash metadata check, PUT blob, set metadata) is the SDK's.
    """
    import azure.ai.ml._artifacts._blob_storage_helper as helper

    real = helper.BlobServiceClient
    monkeypatch.setattr(helper, "BlobServiceClient", lambda *a, **k: real(*a, transport=t, **k))


def job_status_route(t: RecordingTransport, statuses: list, extra: Optional[Callable[[dict], None]] = None):
    """GET /jobs/<name> answers the last PUT body with each status in turn (the last one repeats)."""
    state = {"i": 0}

    def answer(rec: Recorded):
        put = [r for r in t.requests if r.method == "PUT" and "/jobs/" in r.path]
        body = echo_job(put[-1], statuses[min(state["i"], len(statuses) - 1)])
        state["i"] += 1
        if extra:
            extra(body)
        return body

    t.on("GET", r"/jobs/[^/?]+\?", answer)
    return t


class BoundedSleep:
    """A no-op sleep for polling loops that fails the test instead of spinning forever."""

    def __init__(self, limit: int = 20):
        self.calls: list = []
        self.limit = limit

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if len(self.calls) > self.limit:
            raise AssertionError(f"polled more than {self.limit} times: the job never reached a terminal state")


def words(messages) -> "tuple[int, int]":
    """A stand-in token counter (one token per word, +4 per message for the chat template)."""
    total = sum(len(str(m.get("content", "")).split()) + 4 for m in messages)
    assistant = sum(len(str(m.get("content", "")).split()) for m in messages if m.get("role") == "assistant")
    return total, assistant


def fast_token_counter(monkeypatch) -> None:
    """Count tokens without building the tiny model (tests of the Azure flow, not of tokenization)."""
    import phitune.azure.cost as cost

    monkeypatch.setattr(cost, "_token_counter", lambda cfg: (words, "a word counter (test)", True))


def model_version(name: str, version: str = "1") -> dict:
    return {"id": f"{ARM}/models/{name}/versions/{version}", "name": version,
            "type": "Microsoft.MachineLearningServices/workspaces/models/versions",
            "properties": {"modelType": "mlflow_model", "jobName": "ft-job",
                           "modelUri": "azureml://jobs/ft-job/outputs/registered_model", "flavors": {},
                           "properties": {}, "tags": {}, "isArchived": False},
            "systemData": {"createdAt": "2025-01-01T00:00:00Z"}}


REGISTRY_MODEL = "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/14"


def add_registry_routes(t: RecordingTransport, version: str = "14") -> RecordingTransport:
    """The azureml system registry: discovery, then its Phi-4-mini-instruct whose label `latest` is `version`."""
    sub, rg = "11111111-2222-3333-4444-555555555555", "registry-builtin-prod-eastus-01"
    uri = f"azureml://registries/azureml/models/Phi-4-mini-instruct/versions/{version}"
    mv = {"id": uri, "name": version,
          "properties": {"modelType": "mlflow_model", "modelUri": uri, "properties": {}, "tags": {}, "flavors": {}},
          "systemData": {"createdAt": "2025-01-01T00:00:00Z"}}
    t.on("GET", r"/registries/azureml/discovery",
         {"registryName": "azureml", "primaryRegionResourceProviderUri": "https://cert-eastus.experiments.azureml.net/",
          "subscriptionId": sub, "resourceGroup": rg, "registryFqdns": {"eastus": {"api": "eastus.api.azureml.ms"}}})
    t.on("GET", r"/registries/azureml/models/[^/]+/versions\?", {"value": [mv]})
    t.on("GET", rf"/registries/azureml/models/[^/]+/versions/{version}\?", mv)
    return t


def add_model_routes(t: RecordingTransport, version: str = "1") -> RecordingTransport:
    """Workspace models: the latest version of any name is `version`."""
    t.on("GET", r"/workspaces/[^/]+/models/[^/]+/versions\?", lambda r: {"value": [model_version(r.path.split("/")[-2], version)]})
    t.on("GET", rf"/workspaces/[^/]+/models/[^/]+/versions/{version}\?", lambda r: model_version(r.path.split("/")[-3], version))
    return t


def workspace_body(location: str = "eastus") -> dict:
    return {"id": ARM, "name": WS, "location": location, "type": "Microsoft.MachineLearningServices/workspaces",
            "kind": "Default", "properties": {"workspaceId": "8f1b1c9e-0000-0000-0000-000000000000",
                                              "discoveryUrl": f"https://{location}.api.azureml.ms/discovery",
                                              "mlFlowTrackingUri": f"azureml://{location}.api.azureml.ms/mlflow/v1.0{ARM}"}}


def echo_provisioned(rec: Recorded, extra: Optional[dict] = None) -> dict:
    """Answer an ARM PUT (endpoint, deployment) as finished: the body sent, provisioningState Succeeded."""
    parts = rec.path.rstrip("/").split("/")
    body = dict(rec.body) if isinstance(rec.body, dict) else {}
    props = {**dict(body.get("properties", {})), "provisioningState": "Succeeded", **(extra or {})}
    return {**body, "id": rec.path, "name": parts[-1], "properties": props,
            "systemData": {"createdAt": "2025-01-01T00:00:00Z", "lastModifiedAt": "2025-01-01T00:00:00Z",
                           "createdBy": "tests", "lastModifiedBy": "tests"}}


def add_endpoint_routes(t: RecordingTransport, exists: bool = False) -> RecordingTransport:
    """Online endpoints and deployments that provision at once; GET of the endpoint 404s until created."""
    t.on("GET", r"/workspaces/[^/]+\?", workspace_body())

    def scoring(rec):
        name = rec.path.rstrip("/").split("/")[-1]
        return {"scoringUri": f"https://{name}.eastus.inference.ml.azure.com/score",
                "swaggerUri": f"https://{name}.eastus.inference.ml.azure.com/swagger.json"}

    def get_endpoint(rec):
        puts = [r for r in t.requests if r.method == "PUT" and re.search(r"/onlineEndpoints/[^/]+$", r.path)]
        if puts:
            return echo_provisioned(puts[-1], scoring(puts[-1]))
        if exists:
            return echo_provisioned(Recorded("PUT", rec.url, {}, {"location": "eastus", "properties":
                                                                    {"authMode": "Key", "properties": {}}}), scoring(rec))
        return 404, {"error": {"code": "ResourceNotFound", "message": "endpoint not found"}}

    t.on("GET", r"/onlineEndpoints/[^/]+\?", get_endpoint)
    t.on("GET", r"/onlineEndpoints/[^/]+/deployments\?", {"value": []})
    default_scale = {"scaleSettings": {"scaleType": "Default"}}
    t.on("PUT", r"/onlineEndpoints/[^/]+/deployments/[^/]+\?", lambda rec: (201, echo_provisioned(rec, default_scale)))
    t.on("PUT", r"/onlineEndpoints/[^/]+\?", lambda rec: (201, echo_provisioned(rec, scoring(rec))))
    t.on("GET", r"/onlineEndpoints/[^/]+/deployments/[^/]+\?",
         lambda rec: echo_provisioned([r for r in t.requests if r.method == "PUT" and "/deployments/" in r.path][-1],
                                      default_scale))
    t.on("DELETE", r"/onlineEndpoints/", (200, None))
    return t
