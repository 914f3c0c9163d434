"""backend=azureml command jobs: built offline, dumped, reloaded, and 'sent' to a recording transport.

Nothing here talks to Azure: MLClient runs over tests/azure_transport.RecordingTransport.
"""
from __future__ import annotations

import shlex

import azure_transport  # noqa: F401  first: imports azure-ai-ml with its marshmallow warnings silenced
import pytest
from azure.ai.ml import load_job
from hydra import compose, initialize_config_dir

from azure_transport import ARM, REPO, RG, SUB, WS, BoundedSleep, FakeCredential, RecordingTransport, code_version, echo_job, \
    echo_versioned, fast_token_counter, job_status_route
from phitune.azure.command_job import build_command_job, remote_command, remote_overrides
from phitune.azure.settings import backend_settings
from phitune.azure.submit import submit
from phitune.errors import PhituneError

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*:Warning:marshmallow"),
              pytest.mark.filterwarnings("ignore:.*:Warning:azure")]

WS_OVERRIDES = [f"backend.subscription_id={SUB}", f"backend.resource_group={RG}", f"backend.workspace={WS}"]


def compose_cfg(overrides):
    import phitune.config  # noqa: F401  registers phitune_base

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _project(monkeypatch, tmp_path):
    monkeypatch.setenv("PHITUNE_ROOT", str(REPO))  # conf/data/*.yaml find data/ from here
    monkeypatch.chdir(tmp_path)
    fast_token_counter(monkeypatch)


def small_project(tmp_path):
    """A minimal code folder, so hashing the code snapshot takes milliseconds (the repo has a .venv)."""
    root = tmp_path / "proj"
    (root / "conf").mkdir(parents=True)
    (root / "train.py").write_text("print('train')\n")
    return root


@pytest.mark.parametrize("overrides, kept", [
    (["backend=azureml", "backend.dry_run=true", "train.epochs=2"], ["train.epochs=2"]),
    (["+backend.extra=1", "~backend.follow", "train.lora.rank=16"], ["train.lora.rank=16"]),
    (["hydra.run.dir=x", "hydra/launcher=joblib", "model=tiny-phi3"], ["model=tiny-phi3"]),
    (["tracking.uri=sqlite:///x.db", "tracking.experiment=e", "trial.number=3"], ["tracking.experiment=e"]),
    (["sweep=lr-only", "train.epochs=1"], ["train.epochs=1"]),
    (["data.train_file=/a.jsonl", "data.validation=auto"], ["data.validation=auto"]),
])
def test_remote_overrides_drop_submission_only_keys(overrides, kept):
    assert remote_overrides(overrides, replaced={"data.train_file"}) == kept


def test_remote_command_runs_train_py_locally_with_data_inputs():
    cmd = remote_command(["backend=azureml", "train.epochs=2", "train.lora.target_modules=[qkv_proj,o_proj]"],
                         {"train_file": 1, "validation_file": 1})
    assert shlex.split(cmd) == ["python", "train.py", "train.epochs=2", "train.lora.target_modules=[qkv_proj,o_proj]",
                                "backend=local", "data.train_file=${{inputs.train_file}}",
                                "data.validation_file=${{inputs.validation_file}}"]


def test_secret_in_override_is_refused(monkeypatch):
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "canary-s3cr3t-value-123")
    with pytest.raises(PhituneError, match="credential or key"):
        remote_overrides(["+train.note=canary-s3cr3t-value-123"])
    with pytest.raises(PhituneError, match="credential or key"):
        remote_overrides(["+backend_api_key=whatever"])


def test_backend_typo_is_refused_with_the_known_fields():
    cfg = compose_cfg(["backend=azureml", "+backend.instance_typ=Standard_NC6"])
    with pytest.raises(PhituneError, match="instance_typ.*fields:.*instance_type"):
        backend_settings(cfg.backend)


def test_dry_run_writes_job_yaml_that_load_job_reads(tmp_path, capsys, monkeypatch):
    import azure.ai.ml

    monkeypatch.setattr(azure.ai.ml, "MLClient", None)  # a dry run must not even build a client
    overrides = ["backend=azureml", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure",
                 "backend.compute=gpu-cluster", "backend.experiment=phitune-az", "train.epochs=2",
                 "train.learning_rate_multiplier=0.5"]
    cfg = compose_cfg(overrides)
    assert submit(cfg, overrides) is None
    out = capsys.readouterr().out
    assert "nothing was submitted" in out and "billed training tokens" in out

    path = tmp_path / "azure" / "job.yaml"
    job = load_job(path)
    assert job.type == "command"
    assert shlex.split(job.command) == [
        "python", "train.py", "train.epochs=2", "train.learning_rate_multiplier=0.5",
        "backend=local", "data.train_file=${{inputs.train_file}}", "data.validation_file=${{inputs.validation_file}}"]
    assert job.compute == "gpu-cluster"
    assert job.experiment_name == "phitune-az"
    assert job.environment.image.startswith("mcr.microsoft.com/azureml/")
    assert "azureml-mlflow" in str(job.environment.conda_file)
    assert job.environment_variables == {"PYTHONPATH": "src"}
    assert {k: v.type for k, v in job.inputs.items()} == {"train_file": "uri_file", "validation_file": "uri_file"}
    # Local paths are written relative to the YAML and point at the real files (az ml resolves them from there).
    assert (path.parent / job.inputs["train_file"].path).resolve() == REPO / "data" / "support_train.jsonl"
    assert (path.parent / job.code).resolve() == REPO
    assert job.resources.instance_type == "Standard_NC24ads_A100_v4"
    assert job.tags["phitune.backend"] == "azureml"


def test_serverless_when_no_compute(tmp_path):
    cfg = compose_cfg(["backend=azureml", "backend.instance_type=Standard_NC6s_v3", "backend.instance_count=2"])
    job = build_command_job(cfg, [], backend_settings(cfg.backend), code_dir=str(small_project(tmp_path)))
    path = tmp_path / "job.yaml"
    job._to_job().dump(path)
    loaded = load_job(path)
    assert loaded.compute is None
    assert loaded.resources.instance_type == "Standard_NC6s_v3" and loaded.resources.instance_count == 2
    assert loaded.distribution.type == "pytorch"  # several nodes: Azure launches one process per node


def _workspace_transport():
    t = RecordingTransport()
    # The code snapshot's hash is already registered: the SDK reuses it instead of uploading.
    t.on("GET", r"/codes/[^/]+/versions\?", {"value": [code_version()]})
    t.on("GET", r"/codes/phitune-code/versions/1\?", code_version())
    t.on("PUT", r"/environments/[^/]+/versions/", echo_versioned)
    t.on("PUT", r"/jobs/[^/?]+\?", lambda rec: (201, echo_job(rec)))
    return t


def test_create_or_update_sends_the_expected_job(tmp_path, capsys):
    """The PUT MLClient sends for the command job: path, command, code, environment, inputs, compute."""
    overrides = ["backend=azureml", *WS_OVERRIDES, f"backend.code_dir={small_project(tmp_path)}",
                 "backend.follow=false", "backend.environment=azureml:phitune-env:3", "backend.compute=gpu-cluster",
                 "data.train_file=azureml:support_train:1", "data.validation_file=azureml:support_valid:1",
                 "train.epochs=2"]
    cfg = compose_cfg(overrides)
    t = _workspace_transport()
    submit(cfg, overrides, credential=FakeCredential(), transport=t)

    puts = t.sent("PUT", r"/jobs/")
    assert len(puts) == 1
    put = puts[0]
    assert put.host == "management.azure.com"
    assert put.path.startswith(f"{ARM}/jobs/")
    props = put.body["properties"]
    assert props["jobType"] == "Command"
    assert shlex.split(props["command"]) == ["python", "train.py", "train.epochs=2", "backend=local",
                                             "data.train_file=${{inputs.train_file}}",
                                             "data.validation_file=${{inputs.validation_file}}"]
    assert props["codeId"] == f"{ARM}/codes/phitune-code/versions/1"
    assert props["environmentId"] == f"{ARM}/environments/phitune-env/versions/3"
    assert props["computeId"] == f"{ARM}/computes/gpu-cluster"
    assert props["inputs"]["train_file"] == {"jobInputType": "uri_file", "uri": f"{ARM}/data/support_train/versions/1"}
    assert props["environmentVariables"] == {"PYTHONPATH": "src"}
    assert props["experimentName"] == "phitune"
    assert put.headers["Authorization"] == f"Bearer {FakeCredential.TOKEN}"
    out = capsys.readouterr().out
    assert "submitted Azure ML job" in out and "https://ml.azure.com/runs/" in out


def test_submit_follows_until_completed(tmp_path, capsys):
    overrides = ["backend=azureml", *WS_OVERRIDES, f"backend.code_dir={small_project(tmp_path)}",
                 "backend.environment=azureml:phitune-env:3", "data.train_file=azureml:support_train:1",
                 "data.validation_file=azureml:support_valid:1"]
    cfg = compose_cfg(overrides)
    t = job_status_route(_workspace_transport(), ["Queued", "Running", "Running", "Completed"])
    sleeps = BoundedSleep()
    submit(cfg, overrides, credential=FakeCredential(), transport=t, sleep=sleeps)
    err = capsys.readouterr().err
    assert [line.split(": ")[-1] for line in err.splitlines() if line.startswith("azure job")] == \
        ["Queued", "Running", "Completed"]
    assert sleeps.calls == [30.0, 30.0, 30.0]  # backend.poll_seconds between GETs
    assert len(t.sent("GET", r"/jobs/")) == 4


def test_failed_job_is_an_error(tmp_path):
    overrides = ["backend=azureml", *WS_OVERRIDES, f"backend.code_dir={small_project(tmp_path)}",
                 "backend.environment=azureml:phitune-env:3", "data.train_file=azureml:support_train:1",
                 "data.validation_file=azureml:support_valid:1"]
    cfg = compose_cfg(overrides)
    t = job_status_route(_workspace_transport(), ["Running", "Failed"])
    with pytest.raises(PhituneError, match="ended Failed; logs: https://ml.azure.com/runs/"):
        submit(cfg, overrides, credential=FakeCredential(), transport=t, sleep=BoundedSleep())


def test_missing_workspace_is_a_clear_error(tmp_path, monkeypatch):
    for var in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"):
        monkeypatch.delenv(var, raising=False)
    overrides = ["backend=azureml", f"backend.code_dir={small_project(tmp_path)}",
                 "data.train_file=azureml:support_train:1", "data.validation_file=azureml:v:1"]
    t = RecordingTransport()
    with pytest.raises(PhituneError, match="subscription_id, resource_group, workspace not set"):
        submit(compose_cfg(overrides), overrides, credential=FakeCredential(), transport=t)
    assert t.requests == []


def test_bad_data_stops_before_anything_is_built_or_sent(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user"}]}\nnot json\n')
    overrides = ["backend=azureml", *WS_OVERRIDES, f"backend.code_dir={small_project(tmp_path)}",
                 f"data.train_file={bad}", "data.validation=none"]
    t = RecordingTransport()
    from phitune.errors import DataError

    with pytest.raises(DataError):
        submit(compose_cfg(overrides), overrides, credential=FakeCredential(), transport=t)
    assert t.requests == []


def test_azure_errors_are_one_line_messages(tmp_path):
    from azure.core.exceptions import ClientAuthenticationError

    overrides = ["backend=azureml", *WS_OVERRIDES, f"backend.code_dir={small_project(tmp_path)}",
                 "backend.environment=azureml:phitune-env:3", "data.train_file=azureml:support_train:1",
                 "data.validation_file=azureml:support_valid:1"]
    cfg = compose_cfg(overrides)
    t = _workspace_transport()
    t.routes.insert(0, azure_transport.Route("PUT", __import__("re").compile(r"/jobs/"),
                                             (403, {"error": {"code": "AuthorizationFailed",
                                                              "message": "no write permission on the workspace"}})))
    with pytest.raises(PhituneError, match="Azure answered 403.*no write permission"):
        submit(cfg, overrides, credential=FakeCredential(), transport=t)

    class NoLogin:
        def get_token(self, *scopes, **kwargs):
            raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")

    with pytest.raises(PhituneError, match="sign-in failed.*az login"):
        submit(cfg, overrides, credential=NoLogin(), transport=_workspace_transport())


def test_local_model_folder_becomes_an_input(tmp_path):
    model = tmp_path / "my-phi3"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = compose_cfg(["backend=azureml", f"model.path={model}"])
    job = build_command_job(cfg, [f"model.path={model}", "train.epochs=1"], backend_settings(cfg.backend),
                            code_dir=str(small_project(tmp_path)))
    assert job.inputs["model_path"].type == "uri_folder"
    args = shlex.split(job.command)
    assert "model.path=${{inputs.model_path}}" in args and f"model.path={model}" not in args


# -- backend.tier: low-priority VMs and resume from the last checkpoint ---------------------------------------

def test_low_priority_job_checkpoints_to_an_output_and_resumes(tmp_path, capsys):
    overrides = ["backend=azureml", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure",
                 "backend.tier=low_priority", "train.epochs=2", "train.output_dir=/local/ckpt"]
    submit(compose_cfg(overrides), overrides)
    job = load_job(tmp_path / "azure" / "job.yaml")
    assert job.queue_settings.job_tier == "spot"  # serverless: Azure's low-priority VMs, chosen per job
    out = job.outputs["checkpoints"]
    assert (out.type, out.mode) == ("uri_folder", "rw_mount")  # written to the datastore as it is saved
    args = shlex.split(job.command)
    assert args[-2:] == ["train.output_dir=${{outputs.checkpoints}}", "resume=true"]
    assert "train.output_dir=/local/ckpt" not in args and "train.epochs=2" in args
    assert "note:" not in capsys.readouterr().err


def test_low_priority_on_a_cluster_pins_the_folder_and_says_the_cluster_decides(tmp_path, capsys):
    path = "azureml://datastores/workspaceblobstore/paths/phitune/ckpt/run-1"
    overrides = ["backend=azureml", "backend.dry_run=true", f"backend.output_dir={tmp_path}/azure",
                 "backend.tier=low_priority", "backend.compute=gpu-cluster", f"backend.checkpoint_path={path}"]
    submit(compose_cfg(overrides), overrides)
    job = load_job(tmp_path / "azure" / "job.yaml")
    assert job.queue_settings is None  # a cluster's VMs are low priority by the cluster's own tier
    assert job.outputs["checkpoints"].path == path  # a resubmitted job finds the same checkpoints
    assert "resume=true" in shlex.split(job.command)
    (note,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert "backend.compute=gpu-cluster" in note and "--tier low_priority" in note


def test_dedicated_job_has_no_queue_settings_or_resume(tmp_path):
    cfg = compose_cfg(["backend=azureml"])
    job = build_command_job(cfg, [], backend_settings(cfg.backend), code_dir=str(small_project(tmp_path)))
    assert job.queue_settings is None and not job.outputs and "resume=true" not in job.command


def test_tier_typo_is_refused_with_the_choices():
    cfg = compose_cfg(["backend=azureml", "backend.tier=spot"])
    with pytest.raises(PhituneError, match="tier.*spot.*dedicated.*low_priority"):
        backend_settings(cfg.backend)
