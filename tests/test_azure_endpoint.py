"""`phitune deploy --target azureml` and undeploy: managed online endpoints, offline."""
from __future__ import annotations

import json
from functools import partial

import azure_transport  # noqa: F401  first: imports azure-ai-ml with its marshmallow warnings silenced
import pytest
from azure.ai.ml import load_online_deployment, load_online_endpoint

from azure_transport import ARM, RG, SUB, WS, FakeCredential, RecordingTransport, add_endpoint_routes, \
    add_storage_routes, echo_versioned, route_blob_storage
from phitune.azure.endpoint import deploy_azure, undeploy_azure
from phitune.azure.settings import AzureMLBackend
from phitune.errors import PhituneError

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:.*:Warning:marshmallow"),
              pytest.mark.filterwarnings("ignore:.*:Warning:azure"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*noload.*")]

SETTINGS = AzureMLBackend(subscription_id=SUB, resource_group=RG, workspace=WS)


@pytest.fixture(scope="module")
def _registry_db(tmp_path_factory):
    """A MLflow registry built once (creating a sqlite store takes seconds): support-bot v1 (an MLflow
    model folder, alias champion) and phi3-ft v1 (linked from a Foundry job: source azureml://...,
    tag azure_model_id)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    model = root / "model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: phitune.tracking.pyfunc_model\n"
                                   "    python_version: 3.11.0\nmlflow_version: 3.0.0\n")
    (model / "python_model.pkl").write_bytes(b"not really a pickle")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("support-bot")
    client.create_model_version("support-bot", source=str(model))
    client.set_registered_model_alias("support-bot", "champion", "1")
    client.create_registered_model("phi3-ft")
    client.create_model_version("phi3-ft", source=f"azureml://subscriptions/{SUB}/resourceGroups/{RG}/workspaces/{WS}"
                                                   "/models/phi3-ft/versions/1",
                                tags={"azure_model_id": f"{ARM}/models/phi3-ft/versions/1"})
    return root / "mlflow.db"


@pytest.fixture
def registry(_registry_db, tmp_path, monkeypatch):
    """This test's copy of the registry (a file copy), its own deployments folder and working dir."""
    import shutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PHITUNE_DEPLOYMENTS_DIR", str(tmp_path / "deployments"))
    (tmp_path / "mlruns").mkdir()
    shutil.copy(_registry_db, tmp_path / "mlruns" / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def test_dry_run_writes_endpoint_and_deployment_yaml(registry, tmp_path, capsys):
    out = tmp_path / "deploy"
    assert deploy_azure("models:/support-bot@champion", SETTINGS, instance_type="Standard_DS3_v2", instance_count=2,
                        endpoint_name="support-bot-ep", dry_run=True, output_dir=str(out), tracking_uri=registry) is None
    assert "nothing was submitted" in capsys.readouterr().out
    endpoint = load_online_endpoint(out / "endpoint.yaml")
    assert (endpoint.name, endpoint.auth_mode) == ("support-bot-ep", "key")
    deployment = load_online_deployment(out / "deployment.yaml")
    assert (deployment.name, deployment.endpoint_name) == ("blue", "support-bot-ep")
    assert (deployment.instance_type, deployment.instance_count) == ("Standard_DS3_v2", 2)
    assert deployment.model.type == "mlflow_model"
    assert (deployment.model.name, str(deployment.model.version)) == ("support-bot", "1")
    assert (out / deployment.model.path / "MLmodel").is_file()  # the downloaded MLflow model, relative to the YAML
    assert not (tmp_path / "deployments").exists()  # a dry run records nothing


def test_deploy_foundry_linked_model_over_transport_and_record(registry, tmp_path, capsys):
    t = add_endpoint_routes(RecordingTransport())
    record = deploy_azure("models:/phi3-ft/1", SETTINGS, endpoint_name="phi3-ft-ep", tracking_uri=registry,
                          credential=FakeCredential(), transport=t)
    endpoint_puts = t.sent("PUT", r"/onlineEndpoints/phi3-ft-ep$")
    assert [p.body["properties"]["authMode"] for p in endpoint_puts] == ["Key", "Key"]
    assert endpoint_puts[-1].body["properties"]["traffic"] == {"blue": 100}  # all traffic once deployed
    (dep,) = t.sent("PUT", r"/onlineEndpoints/phi3-ft-ep/deployments/blue$")
    assert dep.body["properties"]["model"] == f"{ARM}/models/phi3-ft/versions/1"  # the Azure model, not re-uploaded
    assert dep.body["properties"]["instanceType"] == "Standard_NC6s_v3"
    assert dep.body["sku"]["capacity"] == 1
    assert not [r for r in t.requests if "blob.core.windows.net" in r.host]

    # The deployment record, in the format shared with `phitune deployments` / `undeploy`.
    saved = json.loads((tmp_path / "deployments" / f"{record['id']}.json").read_text())
    assert saved["target"] == "azureml" and saved["state"] == "active"
    assert (saved["model_name"], saved["model_version"], saved["model_uri"]) == ("phi3-ft", "1", "models:/phi3-ft/1")
    assert saved["url"] == "https://phi3-ft-ep.eastus.inference.ml.azure.com/score"
    assert (saved["endpoint_name"], saved["deployment_name"]) == ("phi3-ft-ep", "blue")
    assert saved["created_at"].endswith("+00:00")
    assert saved["azure"] == {"subscription_id": SUB, "resource_group": RG, "workspace": WS, "endpoint_created": True}
    from phitune.deployments import active_for

    assert [r["id"] for r in active_for("phi3-ft", "1")] == [record["id"]]  # the registry's delete guard sees it
    out = capsys.readouterr().out
    assert "get-credentials" in out and "phitune undeploy" in out


def test_deploy_uploads_a_local_mlflow_model(registry, monkeypatch):
    t = add_endpoint_routes(RecordingTransport())
    route_blob_storage(monkeypatch, t)
    add_storage_routes(t)
    t.on("GET", r"/models/[^/]+/versions/[^/?]+\?", (404, {"error": {"code": "NotFound", "message": "no such model"}}))
    t.on("PUT", r"/models/[^/]+/versions/", echo_versioned)
    deploy_azure("models:/support-bot@champion", SETTINGS, endpoint_name="support-bot-ep", tracking_uri=registry,
                 credential=FakeCredential(), transport=t)
    blobs = {r.path.rsplit("/", 1)[-1] for r in t.requests if r.method == "PUT" and "blob.core" in r.host
             and "comp=" not in r.url}
    assert {"MLmodel", "python_model.pkl"} <= blobs
    (model_put,) = t.sent("PUT", r"/models/support-bot/versions/1$")
    assert model_put.body["properties"]["modelType"] == "mlflow_model"
    (dep,) = t.sent("PUT", r"/deployments/blue$")
    assert dep.body["properties"]["model"] == f"{ARM}/models/support-bot/versions/1"


def test_undeploy_deletes_the_endpoint_phitune_created(registry):
    t = add_endpoint_routes(RecordingTransport())
    record = deploy_azure("models:/phi3-ft/1", SETTINGS, endpoint_name="phi3-ft-ep", tracking_uri=registry,
                          credential=FakeCredential(), transport=t)
    t.requests.clear()
    message = undeploy_azure(record, credential=FakeCredential(), transport=t)
    (delete,) = t.sent("DELETE")
    assert delete.path == f"{ARM}/onlineEndpoints/phi3-ft-ep"
    assert "deleted Azure ML endpoint phi3-ft-ep" in message


def test_undeploy_keeps_an_endpoint_that_existed_before(registry):
    t = add_endpoint_routes(RecordingTransport(), exists=True)
    record = deploy_azure("models:/phi3-ft/1", SETTINGS, endpoint_name="shared-ep", tracking_uri=registry,
                          credential=FakeCredential(), transport=t)
    assert record["azure"]["endpoint_created"] is False
    t.requests.clear()
    undeploy_azure(record, credential=FakeCredential(), transport=t)
    (delete,) = t.sent("DELETE")
    assert delete.path == f"{ARM}/onlineEndpoints/shared-ep/deployments/blue"


def test_undeploy_of_a_missing_endpoint_is_not_an_error(registry):
    t = RecordingTransport()
    t.on("DELETE", r"/onlineEndpoints/", (404, {"error": {"code": "ResourceNotFound", "message": "gone"}}))
    t.on("GET", r"/workspaces/[^/]+\?", azure_transport.workspace_body())
    record = {"id": "abc", "target": "azureml", "endpoint_name": "gone-ep", "deployment_name": "blue",
              "azure": {"subscription_id": SUB, "resource_group": RG, "workspace": WS, "endpoint_created": True}}
    assert "already gone" in undeploy_azure(record, credential=FakeCredential(), transport=t)


@pytest.mark.parametrize("uri, match", [
    ("models:/nope/1", "nope"),
    ("runs-are-not-deployable", "expected azureml:NAME:VERSION, models:/NAME@ALIAS"),
])
def test_bad_model_uri(registry, uri, match):
    with pytest.raises(PhituneError, match=match):
        deploy_azure(uri, SETTINGS, dry_run=True, tracking_uri=registry)


def test_cli_deploy_and_undeploy(registry, tmp_path, monkeypatch, capsys):
    """`phitune deploy ... --target azureml` then the serving engineer's `phitune undeploy ID`."""
    import azure.ai.ml

    import phitune.azure.workspace as workspace
    from phitune.cli import main

    t = add_endpoint_routes(RecordingTransport())
    monkeypatch.setattr(workspace, "default_credential", FakeCredential)  # never DefaultAzureCredential in tests
    monkeypatch.setattr(azure.ai.ml, "MLClient", partial(azure.ai.ml.MLClient, transport=t))
    for var, value in (("AZURE_SUBSCRIPTION_ID", SUB), ("AZURE_RESOURCE_GROUP", RG), ("AZUREML_WORKSPACE_NAME", WS)):
        monkeypatch.setenv(var, value)
    assert main(["deploy", "models:/phi3-ft/1", "--target", "azureml", "--endpoint-name", "cli-ep",
                 "--tracking-uri", registry]) == 0
    dep_id = capsys.readouterr().out.split("phitune undeploy ")[-1].split(")")[0]
    assert main(["undeploy", dep_id, "--tracking-uri", registry]) == 0
    assert t.sent("DELETE", r"/onlineEndpoints/cli-ep$")
    saved = json.loads((tmp_path / "deployments" / f"{dep_id}.json").read_text())
    assert saved["state"] == "deleted"


def test_cli_deploy_without_workspace_is_a_clear_error(registry, monkeypatch, capsys):
    from phitune.cli import main

    for var in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert main(["deploy", "models:/phi3-ft/1", "--tracking-uri", registry]) == 1
    assert "subscription_id, resource_group, workspace not set" in capsys.readouterr().err
