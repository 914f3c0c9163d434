"""Credentials and keys never appear in outputs, logs, written YAML, requests' bodies or the MLflow store.

A canary secret is planted where secrets live (AZURE_CLIENT_SECRET, PHITUNE_API_KEY,
an OpenAI key, the storage account key the workspace hands out); every Azure flow
then runs (dry runs and a full Foundry run over the recording transport) and
every output is searched for it.
"""
from __future__ import annotations

import logging

import azure_transport  # noqa: F401  first: imports azure-ai-ml with its marshmallow warnings silenced
import pytest
from hydra import compose, initialize_config_dir

from azure_transport import FAKE_ACCOUNT_KEY, REPO, RG, SUB, WS, BoundedSleep, FakeCredential, RecordingTransport, \
    add_model_routes, add_registry_routes, add_storage_routes, echo_job, fast_token_counter, job_status_route, \
    route_blob_storage

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore:.*:Warning:marshmallow"),
              pytest.mark.filterwarnings("ignore:.*:Warning:azure"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*noload.*")]

CANARIES = {
    "AZURE_CLIENT_SECRET": "canary-client-secret-7f3a9c1e",
    "PHITUNE_API_KEY": "canary-api-key-2b8d4e6f",
    "OPENAI_API_KEY": "sk-canary-openai-5c7e9a1b",
}


def compose_cfg(overrides):
    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


def _files_text(root) -> str:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(out)


def test_canary_secrets_found_nowhere(tmp_path, monkeypatch, capsys, caplog):
    for k, v in CANARIES.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AZURE_CLIENT_ID", "11111111-0000-0000-0000-000000000000")  # an id, not a secret
    monkeypatch.setenv("AZURE_TENANT_ID", "22222222-0000-0000-0000-000000000000")
    monkeypatch.setenv("PHITUNE_ROOT", str(REPO))
    monkeypatch.chdir(tmp_path)
    fast_token_counter(monkeypatch)
    caplog.set_level(logging.DEBUG)  # azure-core's HTTP logging included
    from phitune.azure.submit import submit
    from phitune.azure.sweep_job import submit_sweep

    out_dir = tmp_path / "outputs"
    ws = [f"backend.subscription_id={SUB}", f"backend.resource_group={RG}", f"backend.workspace={WS}"]

    # 1. dry runs of every job type: YAML written, nothing sent
    for overrides in (["backend=azureml", "backend.dry_run=true", f"backend.output_dir={out_dir}/cmd", *ws],
                      ["backend=foundry", "backend.dry_run=true", f"backend.output_dir={out_dir}/ft", "data=auto-split"]):
        submit(compose_cfg(overrides), overrides)
    sweep_overrides = ["backend=azureml", "backend.dry_run=true", f"backend.output_dir={out_dir}/sweep"]
    submit_sweep(compose_cfg(sweep_overrides), {"train.learning_rate_multiplier": "interval(0.5, 2)"},
                 {"n_trials": 4, "sampler": "random", "pruner": "median"}, overrides=sweep_overrides)

    # 2. a full Foundry run over the recording transport, linked into a tmp MLflow store
    t = RecordingTransport()
    route_blob_storage(monkeypatch, t)
    add_storage_routes(t)
    add_registry_routes(t)
    add_model_routes(t)
    t.on("PUT", r"/jobs/[^/?]+\?", lambda rec: (201, echo_job(rec)))
    job_status_route(t, ["Running", "Completed"])
    db = tmp_path / "mlruns" / "mlflow.db"
    overrides = ["backend=foundry", *ws, f"tracking.uri=sqlite:///{db}", f"backend.output_dir={out_dir}/ft2"]
    submit(compose_cfg(overrides), overrides, credential=FakeCredential(), transport=t, sleep=BoundedSleep())
    assert t.sent("PUT", r"/jobs/")  # it did run

    captured = capsys.readouterr()
    haystacks = {
        "stdout": captured.out,
        "stderr": captured.err,
        "logs": caplog.text,
        "written files (YAML, split data)": _files_text(out_dir),
        "MLflow store": _files_text(tmp_path / "mlruns"),
        "request bodies and URLs": "\n".join(f"{r.url}\n{r.body}" for r in t.requests),
    }
    assert (out_dir / "cmd" / "job.yaml").is_file() and (out_dir / "sweep" / "sweep_job.yaml").is_file()
    assert (out_dir / "ft" / "finetuning_job.yaml").is_file() and db.is_file()
    secrets = [*CANARIES.values(), FAKE_ACCOUNT_KEY]
    for where, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"
    # The bearer token goes to Azure in the Authorization header, and nowhere else.
    for where in ("stdout", "stderr", "logs", "MLflow store"):
        assert FakeCredential.TOKEN not in haystacks[where], f"the access token leaked into {where}"
    assert all(r.headers.get("Authorization") == f"Bearer {FakeCredential.TOKEN}"
               for r in t.requests if r.host == "management.azure.com")


def test_secret_tags_are_masked(monkeypatch, tmp_path):
    monkeypatch.setenv("PHITUNE_ROOT", str(REPO))
    monkeypatch.setenv("AZURE_CLIENT_SECRET", CANARIES["AZURE_CLIENT_SECRET"])
    from phitune.azure.command_job import job_tags
    from phitune.azure.settings import backend_settings

    cfg = compose_cfg(["backend=azureml", "+backend.tags.team=nlp", "+backend.tags.api_key=abc12345678",
                       f"+backend.tags.note=x{CANARIES['AZURE_CLIENT_SECRET']}"])
    tags = job_tags(cfg, backend_settings(cfg.backend), "train")
    assert tags["team"] == "nlp" and tags["api_key"] == "***" and tags["note"] == "x***"
