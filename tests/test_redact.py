"""Secrets never reach MLflow: the masking rules, then TrackedRun, a sweep's parent run and
a real training run against a real MLflow server, each searched for planted canaries."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from phitune import redact

REPO = Path(__file__).resolve().parents[1]
C_TAG = "canary-tag-token-81d3f0"
C_URI = "canary-uri-password-5e21ab"
C_NESTED = "canary-nested-hf-token-93c7d2"
C_ENV = "canary-env-api-key-4a6b0e"


def _assert_nowhere(root: Path, *canaries: str) -> int:
    """Every file under root (db bytes, artifacts) free of the canaries; returns the number of files read."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        for c in canaries:
            assert c.encode() not in data, f"{c} in {path}"
    return len(files)


# -- the rules -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["api_token", "tracking.tags.hf_token", "password", "AZURE_CLIENT_SECRET",
                                  "x-api-key", "key", "storage.connection_string", "sas"])
def test_secret_named_keys(name):
    assert redact.is_secret_key(name)


@pytest.mark.parametrize("name", ["max_tokens", "tokenizer", "monkey", "eos_token_id", "key_path", "tracking.uri"])
def test_ordinary_keys_are_not_secret(name):
    assert not redact.is_secret_key(name)


@pytest.mark.parametrize("text, expected", [
    ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
    ("http://user:pw@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
    ("tracking.uri=postgresql+psycopg2://u:p%40ss@h:5432/db", "tracking.uri=postgresql+psycopg2://u:***@h:5432/db"),
    ("http://u:p@ss@host/x", "http://u:***@host/x"),  # an unencoded '@': up to the last one
    ("redis://:pw@h", "redis://:***@h"),
    ("uri: https://u:pw@h\nexperiment: e\n", "uri: https://u:***@h\nexperiment: e\n"),
    ('{"uri": "http://u:pw@h", "a": "x@y"}', '{"uri": "http://u:***@h", "a": "x@y"}'),
    ("API request to http://u:pw@h/api/2.0/x failed", "API request to http://u:***@h/api/2.0/x failed"),
])
def test_url_passwords_are_masked_in_any_text(text, expected):
    assert redact.redact_text(text, set()) == expected
    assert redact.redact_text(expected, set()) == expected  # masking twice changes nothing


@pytest.mark.parametrize("text", ["http://user@host/x", "sqlite:///mlruns/mlflow.db", "models:/chat@champion",
                                  "runs:/abc/model", "mail me at a@b.com", "ratio 3:4 @ noon"])
def test_text_without_a_url_password_is_unchanged(text):
    assert redact.redact_text(text, set()) == text


def test_values_of_secret_named_environment_variables_are_masked(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", C_ENV)
    monkeypatch.setenv("PHITUNE_SHORT_KEY", "abc")  # shorter than 8 characters: not a secret
    monkeypatch.setenv("PHITUNE_DATA_DIR", "/data/canary-not-secret")
    secrets = redact.secret_values()
    assert C_ENV in secrets and "abc" not in secrets and "/data/canary-not-secret" not in secrets
    assert redact.redact_text(f"token {C_ENV} in /data/canary-not-secret, abc") == \
        "token *** in /data/canary-not-secret, abc"


def test_flat_mapping():
    flat = {"tracking.tags.api_token": C_TAG, "tracking.uri": f"postgresql://u:{C_URI}@h/db",
            "note": f"see {C_ENV}", "pin": 12345678, "data.sas": None, "train.epochs": 2, "empty_key": ""}
    out = redact.redact_mapping(flat, {C_ENV, "12345678"})
    assert out == {"tracking.tags.api_token": "***", "tracking.uri": "postgresql://u:***@h/db", "note": "see ***",
                   "pin": "***", "data.sas": None, "train.epochs": 2, "empty_key": ""}
    assert flat["tracking.tags.api_token"] == C_TAG  # the input is left as it was


def test_nested_tree_masks_secret_keys_at_any_depth():
    tree = {"tracking": {"uri": f"http://u:{C_URI}@h", "tags": {"ticket": {"hf_token": C_NESTED}}},
            "list": [{"password": "p4ssw0rd!"}, ("a", C_ENV)], "credentials": {"id": 1, "secret": "s"}}
    out = redact.redact_tree(tree, {C_ENV})
    assert out == {"tracking": {"uri": "http://u:***@h", "tags": {"ticket": {"hf_token": "***"}}},
                   "list": [{"password": "***"}, ("a", "***")], "credentials": "***"}
    assert tree["tracking"]["tags"]["ticket"]["hf_token"] == C_NESTED


def test_override_list_for_display():
    overrides = [f"+tracking.tags.api_token={C_TAG}", f"tracking.uri=postgresql://u:{C_URI}@h/db",
                 f"++train.hf_token={C_NESTED}", "~data.sas", "train.epochs=2", f"+tracking.tags.note={C_ENV}"]
    assert redact.redact_overrides(overrides, {C_ENV}) == [
        "+tracking.tags.api_token=***", "tracking.uri=postgresql://u:***@h/db", "++train.hf_token=***", "~data.sas",
        "train.epochs=2", "+tracking.tags.note=***"]


def test_yaml_masks_keys_at_any_depth_and_keeps_a_clean_document_as_it_is():
    cfg = OmegaConf.create({"tracking": {"uri": f"http://u:{C_URI}@h", "tags": {"api_token": C_TAG,
                                                                                "ticket": {"hf_token": C_NESTED}}},
                            "train": {"epochs": 2}})
    cfg.tracking.tags.note = C_ENV  # a plain scalar: `note: ***` as text would not read back (an alias)
    out = redact.redact_yaml(OmegaConf.to_yaml(cfg), {C_ENV})
    assert C_TAG not in out and C_URI not in out and C_NESTED not in out and C_ENV not in out
    back = OmegaConf.create(out)
    assert back.tracking.tags.api_token == "***" and back.tracking.tags.ticket.hf_token == "***"
    assert back.tracking.tags.note == "***"
    assert back.tracking.uri == "http://u:***@h" and back.train.epochs == 2
    clean = OmegaConf.to_yaml(OmegaConf.create({"model": {"name": "tiny-phi3", "path": None}, "lr": 1e-4}))
    assert redact.redact_yaml(clean, set()) == clean
    assert redact.redact_yaml(f"not: [yaml http://u:{C_URI}@h", set()) == "not: [yaml http://u:***@h"


def test_mlflow_is_told_not_to_print_a_uri_with_a_password(monkeypatch):
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    redact.quiet_mlflow_url("http://127.0.0.1:5000")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "false"
    redact.quiet_mlflow_url(f"http://u:{C_URI}@127.0.0.1:5000")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


# -- TrackedRun: tags, params, YAML and the error tag ---------------------------------------
def test_tracked_run_masks_every_tag_param_artifact_and_the_error(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from phitune.tracking.run import TrackedRun

    monkeypatch.setenv("PHITUNE_API_KEY", C_ENV)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cfg = OmegaConf.create({"uri": uri, "experiment": "redact", "tags": {}})
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(
        {"tracking": {"uri": f"postgresql://u:{C_URI}@h/db", "tags": {"ticket": {"hf_token": C_NESTED}}}}))
    tags = {"api_token": C_TAG, "note": C_ENV, "where": f"http://u:{C_URI}@h"}
    with pytest.raises(RuntimeError):
        with TrackedRun(cfg, run_name="r", tags=tags) as tracker:
            tracker.log_params({"tracking.uri": f"postgresql://u:{C_URI}@h/db", "a.password": C_TAG, "b": C_ENV})
            tracker.log_text(config_yaml, "config.yaml")
            tracker.log_text(f"connect to http://u:{C_URI}@h with {C_ENV}", "notes.txt")
            tracker.set_tags({"later.hf_token": C_NESTED, "later.note": f"postgresql://u:{C_URI}@h/db"})
            raise RuntimeError(f"cannot reach http://u:{C_URI}@h (key {C_ENV})")
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["api_token"] == "***" and run.data.tags["note"] == "***"
    assert run.data.tags["where"] == "http://u:***@h" and run.data.tags["later.hf_token"] == "***"
    assert run.data.tags["phitune.error"] == "RuntimeError: cannot reach http://u:***@h (key ***)"
    assert run.data.params["tracking.uri"] == "postgresql://u:***@h/db" and run.data.params["a.password"] == "***"
    assert _assert_nowhere(tmp_path / "mlruns", C_TAG, C_URI, C_NESTED, C_ENV) >= 3  # db + 2 artifacts


# -- a sweep's parent run ------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_parent_run_masks_fixed_overrides(tmp_path):
    from sweep_app.harness import make_stores, run, runs, toy_cmd

    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=1", f"+toy.api_token={C_TAG}",
                      f"+toy.endpoint=http://u:{C_URI}@h/v1"))
    assert res.returncode == 0, res.stdout + res.stderr
    parents, children = runs(s)
    assert len(parents) == 1 and len(children) == 1
    fixed = parents[0].data.params["fixed_overrides"]
    assert "+toy.api_token=***" in fixed and "+toy.endpoint=http://u:***@h/v1" in fixed
    # phitune's own summary line; Hydra's launcher logs each job's overrides as typed, outside MLflow.
    (every,) = [line for line in res.stdout.splitlines() if line.startswith("  every trial:")]
    assert "+toy.api_token=***" in every and C_TAG not in every and C_URI not in every
    _assert_nowhere(tmp_path / "mlruns", C_TAG, C_URI)


# -- a real training run against a real MLflow server ------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 without auth: MLflow's client sends a URI's userinfo
    as basic auth, which this server ignores, so a password in the URI is accepted."""
    from sweep_app.harness import mlflow_template_db

    store = tmp_path / "server"
    store.mkdir()
    shutil.copy(mlflow_template_db(), store / "mlflow.db")  # skips ~5 s of schema migrations
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                             "--artifacts-destination", str(store / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240  # seconds; start-up took ~40 s on a busy 2-core machine
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
    yield port, store
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


def _subset(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("\n".join(src.read_text(encoding="utf-8-sig").splitlines()[:n]) + "\n", encoding="utf-8")
    return dst


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_run_stores_no_secret(tmp_path, mlflow_server, monkeypatch, capfd):
    from hydra import compose, initialize_config_dir
    from mlflow.tracking import MlflowClient

    import phitune.config  # noqa: F401
    from phitune.recipe import run

    port, store = mlflow_server
    monkeypatch.setenv("PHITUNE_E2E_API_KEY", C_ENV)  # a secret in the environment that a tag repeats
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    uri = f"http://phitune:{C_URI}@127.0.0.1:{port}"
    train = _subset(REPO / "data/support_train.jsonl", tmp_path / "train.jsonl", 16)
    valid = _subset(REPO / "data/support_valid.jsonl", tmp_path / "valid.jsonl", 4)
    overrides = [f"data.train_file={train}", f"data.validation_file={valid}", f"tracking.uri={uri}",
                 f"train.output_dir={tmp_path}/ckpt", "train.epochs=1", "train.eval_steps=1", "train.progress=false",
                 "train.evaluate_at_end=false", "tracking.log_model=false", f"+tracking.tags.api_token={C_TAG}",
                 f"+tracking.tags.ticket.hf_token={C_NESTED}", f"+tracking.tags.note={C_ENV}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    assert cfg.tracking.uri == uri and cfg.tracking.tags.api_token == C_TAG  # the canaries are really in the config
    run(cfg)

    client = MlflowClient(f"http://127.0.0.1:{port}")
    (r,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.tags["api_token"] == "***" and r.data.tags["ticket.hf_token"] == "***" and r.data.tags["note"] == "***"
    assert r.data.params["tracking.uri"] == f"http://phitune:***@127.0.0.1:{port}"
    config = OmegaConf.load(client.download_artifacts(r.info.run_id, "config.yaml", str(tmp_path / "dl")))
    assert config.tracking.tags.api_token == "***" and config.tracking.tags.ticket.hf_token == "***"
    assert config.model.name == "tiny-phi3"  # the rest of the config is still there for `phitune eval`

    files = _assert_nowhere(store, C_TAG, C_URI, C_NESTED, C_ENV)
    assert files >= 4 and r.info.run_id.encode() in (store / "mlflow.db").read_bytes()  # the scan read the real store
    out, err = capfd.readouterr()
    for c in (C_TAG, C_URI, C_NESTED, C_ENV):
        assert c not in out + err, c
