"""End-to-end runs of the recipe on the tiny Phi-3: tracking, resume, status, the logged model."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from phitune.train.checkpoint import checkpoint_dirs

REPO = Path(__file__).resolve().parents[1]
CANARY = "phitune-canary-secret-4f9a7c21"


def _write_subset(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8-sig").splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train = _write_subset(REPO / "data/support_train.jsonl", d / "train.jsonl", 48)
    valid = _write_subset(REPO / "data/support_valid.jsonl", d / "valid.jsonl", 12)
    return train, valid


def run_overrides(tmp: Path, train: Path, valid: Path, *extra: str) -> list[str]:
    return [f"data.train_file={train}", f"data.validation_file={valid}",
            f"tracking.uri=sqlite:///{tmp}/mlruns/mlflow.db", f"train.output_dir={tmp}/ckpt",
            "train.epochs=2", "train.eval_steps=2", "train.progress=false", "train.evaluate_at_end=false", *extra]


def compose(overrides):
    from hydra import compose as hcompose, initialize_config_dir

    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_data):
    """One finished run that many tests inspect (2 epochs, 12 optimizer steps)."""
    tmp = tmp_path_factory.mktemp("run")
    os.environ["PHITUNE_TEST_API_KEY"] = CANARY  # a secret in the environment must never be logged
    from phitune.recipe import run

    # ... even when a tag repeats it: the tag, its param and config.yaml all carry it unless masked.
    cfg = compose(run_overrides(tmp, *small_data, f"+tracking.tags.support_ticket={CANARY}"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        objective = run(cfg)
    client = MlflowClient(f"sqlite:///{tmp}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("phitune").experiment_id])
    assert len(runs) == 1
    return {"tmp": tmp, "objective": objective, "run": runs[0], "client": client, "stderr": err.getvalue()}


def test_run_returns_final_full_valid_loss(trained_run):
    run = trained_run["run"]
    assert run.info.status == "FINISHED"
    assert trained_run["objective"] == pytest.approx(run.data.metrics["full_valid_loss"])
    assert run.data.metrics["perplexity"] == pytest.approx(2.718281828 ** run.data.metrics["full_valid_loss"], rel=1e-6)


def test_run_ends_with_a_closing_block(trained_run):
    run, tmp = trained_run["run"], trained_run["tmp"]
    rid, uri = run.info.run_id, f"sqlite:///{tmp}/mlruns/mlflow.db"
    block = trained_run["stderr"].splitlines()[-5:]
    assert block == [
        f"run {rid} FINISHED · objective (full_valid_loss) {trained_run['objective']:.4f}",
        f"  see it:  mlflow ui --backend-store-uri {uri}  ->  "
        f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{rid}?workflowType=machine_learning",
        f"  model:   runs:/{rid}/model",
        f"  next:    phitune promote --run {rid} --name MODEL_NAME --tracking-uri {uri}",
        f"           phitune serve runs:/{rid}/model --tracking-uri {uri}",
    ]
    assert "Downloading artifacts" not in trained_run["stderr"]


def test_run_logs_portal_metrics_per_step_and_epoch(trained_run):
    client, run_id = trained_run["client"], trained_run["run"].info.run_id
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 12  # 48 examples / 8 per step x 2 epochs
    for name in ("train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"):
        assert client.get_metric_history(run_id, name), name
    assert [m.step for m in client.get_metric_history(run_id, "full_valid_loss")] == [6, 12]
    first, last = (client.get_metric_history(run_id, "train_loss")[i].value for i in (0, -1))
    assert last < first  # it learned something


def test_run_logs_params_config_dataset_and_artifacts(trained_run):
    client, run = trained_run["client"], trained_run["run"]
    p = run.data.params
    assert p["train.learning_rate_multiplier"] == "1.0" and p["model.name"] == "tiny-phi3"
    assert float(p["derived.learning_rate"]) == pytest.approx(5e-3)  # tiny-phi3's base x 1.0
    assert p["derived.effective_batch"] == "8" and p["derived.epochs"] == "2"
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "results.csv", "loss_curve.png", "adapter", "checkpoints"} <= names
    inputs = run.inputs.dataset_inputs
    assert {i.tags[0].value for i in inputs} == {"training", "validation"}
    assert all(i.dataset.digest for i in inputs)
    assert run.data.tags["phitune.valid_digest"]


def test_results_csv_has_azure_columns(trained_run):
    client, run_id = trained_run["client"], trained_run["run"].info.run_id
    path = client.download_artifacts(run_id, "results.csv", str(trained_run["tmp"] / "dl"))
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                             "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy"]
    assert len(rows) == 12 and rows[5]["full_valid_loss"] and not rows[4]["full_valid_loss"]


def test_checkpoints_are_safetensors_and_logged_per_epoch(trained_run):
    dirs = checkpoint_dirs(trained_run["tmp"] / "ckpt")
    assert [d.name for d in dirs] == ["epoch-001", "epoch-002"]
    assert (dirs[-1] / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(dirs[-1].rglob("*.bin")) and not list(dirs[-1].rglob("*.pt"))
    client, run_id = trained_run["client"], trained_run["run"].info.run_id
    assert {f.path for f in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/epoch-001", "checkpoints/epoch-002"}


def test_logged_model_loads_and_answers_a_chat(trained_run):
    run_id = trained_run["run"].info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{trained_run['tmp']}/mlruns/mlflow.db")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    out = model.predict({"messages": [{"role": "user", "content": "How do I reset my password?"}],
                         "max_tokens": 12, "temperature": 0.0})
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] >= 1


def test_no_secret_reaches_the_tracking_store(trained_run):
    tmp, run = trained_run["tmp"], trained_run["run"]
    assert run.data.tags["support_ticket"] == "***" and run.data.params["tracking.tags.support_ticket"] == "***"
    files = [p for p in (tmp / "mlruns").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)  # the scan reads the artifacts too
    for path in files:
        assert CANARY.encode() not in path.read_bytes(), path


def test_keep_last_three_checkpoints(tmp_path, small_data):
    from phitune.recipe import run

    run(compose(run_overrides(tmp_path, *small_data, "train.epochs=4", "train.max_device_batch=8",
                              "model.base_batch_size=16", "tracking.log_model=false")))
    assert [d.name for d in checkpoint_dirs(tmp_path / "ckpt")] == ["epoch-002", "epoch-003", "epoch-004"]


def _cmd(tmp, train, valid, *extra):
    return [sys.executable, str(REPO / "train.py"), *run_overrides(tmp, train, valid, *extra),
            f"hydra.run.dir={tmp}/hydra"]


def test_killed_run_resumes_to_the_same_weights(tmp_path, small_data):
    """SIGTERM after the first checkpoint -> KILLED; resume=true -> the uninterrupted run's weights."""
    extra = ("train.epochs=3", "tracking.log_model=false", "train.lora.dropout=0.1")
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(_cmd(a, *small_data, *extra), check=True, cwd=REPO, capture_output=True)

    proc = subprocess.Popen(_cmd(b, *small_data, *extra), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (b / "ckpt" / "epoch-001").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    client = MlflowClient(f"sqlite:///{b}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("phitune").experiment_id
    (killed,) = client.search_runs([exp])
    assert killed.info.status == "KILLED"
    done = [d.name for d in checkpoint_dirs(b / "ckpt")]
    assert "epoch-003" not in done, "the run finished before it was killed; the test proves nothing"

    subprocess.run(_cmd(b, *small_data, *extra, "resume=true"), check=True, cwd=REPO, capture_output=True)
    (resumed,) = client.search_runs([exp])  # the same MLflow run continued
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    # the killed process logged some of epoch 2's steps, which the resumed one replays: once each
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train_loss")] == list(range(1, 19))
    wa = load_file(str(a / "ckpt" / "epoch-003" / "trainable.safetensors"))
    wb = load_file(str(b / "ckpt" / "epoch-003" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k


# Put on PYTHONPATH, it makes the training loop's first backward pass run out of memory: CUDA's
# error as torch raises it (no GPU here), or a real failure of torch's host allocator (10 TB
# asked for). Other backward passes (building the tiny model when it is not cached) run as usual.
OOM_AT_BACKWARD = """
import sys

import torch

_plain = torch.Tensor.backward

def _backward(self, *args, **kwargs):
    if sys._getframe(1).f_globals.get("__name__") != "phitune.train.loop":
        return _plain(self, *args, **kwargs)
    if {cuda}:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 79.10 GiB of which 1.02 GiB is free. Including non-PyTorch memory ...")
    torch.empty(10 ** 13, dtype=torch.uint8)

torch.Tensor.backward = _backward
"""


@pytest.mark.parametrize("where", ["GPU", "host"])
def test_a_run_out_of_memory_ends_with_one_line_naming_the_memory_settings(tmp_path, small_data, where):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OOM_AT_BACKWARD.format(cuda=where == "GPU"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(_cmd(tmp_path, *small_data), cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    settings = "lower train.max_device_tokens (tokens per forward pass) or set train.gradient_checkpointing=true"
    detail = ("OutOfMemoryError: CUDA out of memory" if where == "GPU"
              else "DefaultCPUAllocator: can't allocate memory: you tried to allocate 10000000000000 bytes")
    line = f"out of {where} memory: {settings} ({detail})"
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == f"error: {line}", r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("phitune").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["phitune.error"] == line


def test_run_status_failed_and_killed(tmp_path):
    from omegaconf import OmegaConf

    from phitune.config import TrackingConfig
    from phitune.tracking.run import TrackedRun

    cfg = OmegaConf.structured(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="status"))
    with pytest.raises(RuntimeError):
        with TrackedRun(cfg) as failed:
            raise RuntimeError("out of memory, say")
    with pytest.raises(KeyboardInterrupt):
        with TrackedRun(cfg) as interrupted:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with TrackedRun(cfg) as terminated:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    with TrackedRun(cfg) as finished:
        pass
    client = MlflowClient(cfg.uri)
    status = {r.info.run_id: r.info.status for r in client.search_runs([client.get_experiment_by_name("status").experiment_id])}
    assert status[failed.run_id] == "FAILED"
    assert client.get_run(failed.run_id).data.tags["phitune.error"] == "RuntimeError: out of memory, say"
    assert status[interrupted.run_id] == "KILLED" and status[terminated.run_id] == "KILLED"
    assert status[finished.run_id] == "FINISHED"


def test_bad_data_stops_before_any_run(tmp_path, small_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": 3}\n')
    r = subprocess.run(_cmd(tmp_path, bad, small_data[1]), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}:2:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ckpt").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_a_chat(trained_run):
    """The logged model is a standard MLflow model: `mlflow models serve --env-manager local` serves it."""
    import json as _json
    import urllib.request

    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    # mlflow execs `uvicorn` from PATH: as in an activated venv
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{trained_run['tmp']}/mlruns/mlflow.db",
               PATH=f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen([str(mlflow_bin), "models", "serve", "-m", f"runs:/{trained_run['run'].info.run_id}/model",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-6000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow models serve did not come up"
                time.sleep(0.5)
        body = _json.dumps({"messages": [{"role": "user", "content": "Can I get a refund?"}], "max_tokens": 8,
                            "temperature": 0.0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = _json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
