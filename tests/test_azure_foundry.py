"""backend=foundry: serverless fine-tuning through azure.ai.ml.finetuning, offline.

The whole portal workflow runs against the recording transport: data validated
locally and uploaded (datastore, blob PUTs), the job created, polled to
"Completed", and the model it registered linked into a tmp MLflow registry.
"""
from __future__ import annotations

import json

import azure_transport  # noqa: F401  first: imports azure-ai-ml with its marshmallow warnings silenced
import pytest
from azure.ai.ml import load_job
from hydra import compose, initialize_config_dir

from azure_transport import ARM, REGISTRY_MODEL, REPO, RG, SUB, WS, BoundedSleep, FakeCredential, \
    RecordingTransport, add_model_routes, add_registry_routes, add_storage_routes, echo_job, fast_token_counter, \
    job_status_route, route_blob_storage
from phitune.azure.finetune_job import hyperparameters
from phitune.azure.settings import backend_settings
from phitune.azure.submit import submit
from phitune.errors import DataError, PhituneError

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:.*:Warning:marshmallow"),
              pytest.mark.filterwarnings("ignore:.*:Warning:azure"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

WS_OVERRIDES = [f"backend.subscription_id={SUB}", f"backend.resource_group={RG}", f"backend.workspace={WS}"]


def compose_cfg(overrides):
    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _project(monkeypatch, tmp_path):
    monkeypatch.setenv("PHITUNE_ROOT", str(REPO))
    monkeypatch.chdir(tmp_path)
    fast_token_counter(monkeypatch)


@pytest.mark.parametrize("style, extra, want", [
    ("portal", [], {"learning_rate_multiplier": "0.5", "batch_size": "16", "n_epochs": "2"}),
    # tiny-phi3: base_learning_rate 5e-3 x 0.5 = 2.5e-3; base_batch_size 8 x 2 = 16
    ("trainer", [], {"learning_rate": "0.0025", "per_device_train_batch_size": "16", "num_train_epochs": "2"}),
])
def test_hyperparameters_from_phitune_names(style, extra, want):
    cfg = compose_cfg(["backend=foundry", f"backend.hyperparameter_names={style}", "train.learning_rate_multiplier=0.5",
                       "train.batch_size_multiplier=2", "train.epochs=2", *extra])
    assert hyperparameters(cfg, backend_settings(cfg.backend), n_examples=100) == want


def test_auto_epochs_follow_openais_heuristic():
    cfg = compose_cfg(["backend=foundry", "train.epochs=auto"])
    s = backend_settings(cfg.backend)
    assert hyperparameters(cfg, s, n_examples=20)["n_epochs"] == "5"  # 20 x 3 < 100 -> ceil(100/20)
    assert hyperparameters(cfg, s, n_examples=500)["n_epochs"] == "3"
    assert hyperparameters(cfg, s, n_examples=20000)["n_epochs"] == "1"  # 20000 x 3 > 25000


def test_dry_run_yaml_with_automatic_split(tmp_path, capsys):
    overrides = ["backend=foundry", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure", "data=auto-split",
                 "backend.price_per_1k_tokens=0.002", "train.epochs=2", "backend.output_model_name=phi3-support"]
    submit(compose_cfg(overrides), overrides)
    out = capsys.readouterr().out
    assert "billed training tokens" in out and "estimated cost" in out and "nothing was submitted" in out

    job = load_job(tmp_path / "azure" / "finetuning_job.yaml")
    assert type(job).__name__ == "CustomModelFineTuningJob"
    assert job.task == "chatCompletion"
    assert job.model.path == "azureml://registries/azureml/models/Phi-4-mini-instruct/labels/latest"
    assert job.model.type == "mlflow_model"
    assert job.hyperparameters == {"learning_rate_multiplier": "1.0", "batch_size": "8", "n_epochs": "2"}
    assert job.outputs["registered_model"]["name"] == "phi3-support"
    # The automatic split was done locally (same seed as a local run) and written as two files.
    train = tmp_path / "azure" / job.training_data.path
    valid = tmp_path / "azure" / job.validation_data.path
    n_train, n_valid = (sum(1 for _ in open(p)) for p in (train, valid))
    n_all = sum(1 for line in open(REPO / "data" / "support_train.jsonl") if line.strip())
    assert n_train + n_valid == n_all and n_valid == round(0.1 * n_all)
    assert json.loads(train.read_text().splitlines()[0])["messages"]


def test_no_validation_data(tmp_path):
    overrides = ["backend=foundry", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure",
                 "data.validation=none"]
    submit(compose_cfg(overrides), overrides)
    job = load_job(tmp_path / "azure" / "finetuning_job.yaml")
    assert job.validation_data is None


def _foundry_transport(monkeypatch):
    t = RecordingTransport()
    route_blob_storage(monkeypatch, t)
    add_storage_routes(t)
    add_registry_routes(t)
    add_model_routes(t, version="1")
    t.on("PUT", r"/jobs/[^/?]+\?", lambda rec: (201, echo_job(rec)))
    job_status_route(t, ["Queued", "Running", "Running", "Completed"])
    return t


def test_full_flow_upload_submit_poll_link(tmp_path, capsys, monkeypatch):
    db = tmp_path / "mlruns" / "mlflow.db"
    overrides = ["backend=foundry", *WS_OVERRIDES, f"backend.output_dir={tmp_path}/azure", f"tracking.uri=sqlite:///{db}",
                 "train.epochs=2", "backend.data_name_prefix=support"]
    t = _foundry_transport(monkeypatch)
    sleeps = BoundedSleep()
    submit(compose_cfg(overrides), overrides, credential=FakeCredential(), transport=t, sleep=sleeps)

    # 1. data: validated locally, then uploaded to the default datastore and registered as uri_file assets
    blob_puts = [r for r in t.requests if r.method == "PUT" and r.host.endswith("blob.core.windows.net")
                 and "comp=" not in r.url]
    assert {r.path.rsplit("/", 1)[-1] for r in blob_puts} == {"support_train.jsonl", "support_valid.jsonl"}
    data_puts = t.sent("PUT", r"/data/")
    assert sorted(r.path.split("/")[-3] for r in data_puts) == ["support-train", "support-valid"]
    assert all(r.body["properties"]["dataType"] == "uri_file" for r in data_puts)
    # 2. the base model's label was resolved in the azureml registry
    assert t.sent("GET", r"/registries/azureml/discovery")
    # 3. the fine-tuning job, as create_finetuning_job builds it
    (put,) = t.sent("PUT", r"/jobs/")
    assert put.path.startswith(f"{ARM}/jobs/")
    props = put.body["properties"]
    assert props["jobType"] == "FineTuning"
    details = props["fineTuningDetails"]
    assert details["taskType"] == "chatCompletion" and details["modelProvider"] == "Custom"
    assert details["model"] == {"jobInputType": "mlflow_model", "uri": REGISTRY_MODEL}
    asset = {r.path.split("/")[-3]: r.path for r in data_puts}
    assert details["trainingData"] == {"jobInputType": "uri_file", "uri": asset["support-train"]}
    assert details["validationData"] == {"jobInputType": "uri_file", "uri": asset["support-valid"]}
    assert details["hyperParameters"] == {"learning_rate_multiplier": "1.0", "batch_size": "8", "n_epochs": "2"}
    assert props["outputs"]["registered_model"]["assetName"] == "Phi-4-mini-instruct-phitune-ft"
    # 4. polled to Completed, then linked into the local MLflow registry
    err = capsys.readouterr()
    assert "Completed" in err.err
    assert sleeps.calls and set(sleeps.calls) == {60.0}
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    (mv,) = client.search_model_versions("name='Phi-4-mini-instruct-phitune-ft'")
    assert mv.source == (f"azureml://subscriptions/{SUB}/resourceGroups/{RG}/workspaces/{WS}"
                         "/models/Phi-4-mini-instruct-phitune-ft/versions/1")
    assert mv.tags["azure_model_id"] == f"{ARM}/models/Phi-4-mini-instruct-phitune-ft/versions/1"
    assert mv.tags["azure_job_name"] == put.path.rsplit("/", 1)[-1]
    assert "linked Azure model" in err.out


def test_data_asset_already_uploaded_is_reused(tmp_path, monkeypatch):
    overrides = ["backend=foundry", *WS_OVERRIDES, "backend.follow=false",
                 f"backend.model={REGISTRY_MODEL}"]
    t = RecordingTransport()
    t.on("GET", r"/data/[^/]+/versions/[^/?]+\?",
         lambda r: {"id": r.path, "name": r.path.rsplit("/", 1)[-1],
                    "properties": {"dataType": "uri_file", "dataUri": "azureml://datastores/x/paths/y.jsonl"}})
    t.on("PUT", r"/jobs/[^/?]+\?", lambda rec: (201, echo_job(rec)))
    submit(compose_cfg(overrides), overrides, credential=FakeCredential(), transport=t)
    assert not [r for r in t.requests if "blob.core.windows.net" in r.host]  # nothing uploaded again
    assert not t.sent(None, r"/registries/")  # a pinned version needs no registry lookup
    assert len(t.sent("PUT", r"/jobs/")) == 1


def test_invalid_data_is_refused_before_anything_is_sent(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')  # no assistant turn, < 10 examples
    overrides = ["backend=foundry", *WS_OVERRIDES, f"data.train_file={bad}", "data.validation=none"]
    t = RecordingTransport()
    with pytest.raises(DataError):
        submit(compose_cfg(overrides), overrides, credential=FakeCredential(), transport=t)
    assert t.requests == []


def test_over_budget_is_refused_before_anything_is_sent(tmp_path, capsys):
    overrides = ["backend=foundry", *WS_OVERRIDES, "backend.price_per_1k_tokens=1.0", "backend.max_cost=0.5"]
    t = RecordingTransport()
    with pytest.raises(PhituneError, match=r"over backend.max_cost=0.5.*nothing was submitted"):
        submit(compose_cfg(overrides), overrides, credential=FakeCredential(), transport=t)
    assert t.requests == []
    assert "billed training tokens" in capsys.readouterr().out


# -- the fine-tuning lifecycle table (backend.models), checked before anything else ---------------------------

def _no_tokenizing(monkeypatch):
    import phitune.azure.cost as cost

    def refuse(cfg):
        raise AssertionError("the data was tokenized before the base model was checked")

    monkeypatch.setattr(cost, "_token_counter", refuse)


RETIRED = ("backend.model=Phi-3-mini-4k-instruct: Azure retired fine-tuning of this model on 2025-08-30; use "
           "backend=azureml model=phi3-mini-4k to fine-tune it with phitune's own training on Azure ML compute, or "
           "backend.model=Phi-4-mini-instruct (table checked 2026-12-01)")


@pytest.mark.parametrize("model", ["azureml://registries/azureml/models/Phi-3-mini-4k-instruct/labels/latest",
                                   "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/14",
                                   "Phi-3-mini-4k-instruct"])
def test_retired_model_is_refused_before_any_request_or_tokenizing(model, monkeypatch):
    # Before: Phi-3-mini-4k-instruct was the default, and a real run uploaded the data and sent the job.
    _no_tokenizing(monkeypatch)
    overrides = ["backend=foundry", *WS_OVERRIDES, f"backend.model={model}"]
    t = _foundry_transport(monkeypatch)
    with pytest.raises(PhituneError) as err:
        submit(compose_cfg(overrides), overrides, credential=FakeCredential(), transport=t)
    assert str(err.value) == RETIRED
    assert t.requests == []


def test_retired_model_exits_1_with_one_error_line(tmp_path):
    from sweep_app.harness import run

    out = tmp_path / "azure"
    res = run([str(REPO / ".venv/bin/python"), str(REPO / "train.py"), "backend=foundry",
               "backend.model=Phi-3.5-mini-instruct", "backend.dry_run=true", f"backend.output_dir={out}",
               f"hydra.run.dir={tmp_path}/run"], timeout=300, cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    (line,) = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: backend.model=Phi-3.5-mini-instruct: Azure retired fine-tuning of this model on "
                           "2025-08-30; use backend=azureml model=phi3.5-mini")
    assert "billed training tokens" not in res.stdout  # refused before the data was tokenized
    assert not out.exists()


def test_deprecated_model_warns_with_the_dates(tmp_path, capsys):
    overrides = ["backend=foundry", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure",
                 "backend.model=Phi-4-mini-instruct", "++backend.models.Phi-4-mini-instruct.finetune_deprecation=2026-01-15",
                 "++backend.models.Phi-4-mini-instruct.finetune_retirement=2099-01-15",
                 "++backend.models.Phi-4-mini-instruct.replacement=Phi-5"]
    submit(compose_cfg(overrides), overrides)
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning == ("warning: backend.model=Phi-4-mini-instruct: Azure deprecated fine-tuning of this model on "
                       "2026-01-15; it retires on 2099-01-15; move to backend.model=Phi-5 (table checked 2026-12-01)")
    # still submitted (here: written), with the bare name expanded to the registry's latest version
    job = load_job(tmp_path / "azure" / "finetuning_job.yaml")
    assert job.model.path == "azureml://registries/azureml/models/Phi-4-mini-instruct/labels/latest"


def test_default_model_can_still_be_fine_tuned_today():
    from datetime import date

    from phitune.azure.finetune_job import check_lifecycle

    s = backend_settings(compose_cfg(["backend=foundry"]).backend)
    assert s.model == "azureml://registries/azureml/models/Phi-4-mini-instruct/labels/latest"
    check_lifecycle(s, today=date(2026, 12, 1))  # no error, no warning
    for name, entry in s.models.items():  # every replacement is a row that is not itself retired
        if entry.replacement:
            assert not s.models[entry.replacement].finetune_retirement, name


def test_model_missing_from_the_table_is_sent_with_a_note(capsys):
    from phitune.azure.finetune_job import check_lifecycle

    s = backend_settings(compose_cfg(["backend=foundry", "backend.model=azureml:my-base-model:3"]).backend)
    check_lifecycle(s)
    assert "note: backend.model=azureml:my-base-model:3 is not in backend.models" in capsys.readouterr().err


def test_bad_date_in_the_table_names_the_setting():
    from phitune.azure.finetune_job import check_lifecycle

    s = backend_settings(compose_cfg(["backend=foundry",
                                      "++backend.models.Phi-4-mini-instruct.finetune_retirement=soon"]).backend)
    with pytest.raises(PhituneError, match=r"backend.models.Phi-4-mini-instruct.finetune_retirement=soon: expected "
                                           r"a date YYYY-MM-DD"):
        check_lifecycle(s)
