"""The MLflow model a run logs stands on its own: PyPI-resolvable requirements, phitune's
own code as a wheel inside it, a portable base reference, a model card, its metrics.

A LoRA adapter on the tiny Phi-3 (untrained: logging is what is tested) is logged into
a run of a fresh sqlite store; the model folder is then loaded in a fresh interpreter,
from another directory, with phitune imported from the wheel the model carries.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from packaging.requirements import Requirement

from phitune.modeling.loader import apply_training_method, base_reference, load_model
from phitune.tracking.pyfunc_model import log_chat_model

LOAD_AND_CHAT = """
import json, os, sys
import mlflow, phitune
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0.0})
print(json.dumps({"phitune": phitune.__file__, "cwd": os.getcwd(),
                  "reply": out["choices"][0]["message"]["content"], "role": out["choices"][0]["message"]["role"]}))
"""


@pytest.fixture(scope="module")
def adapter(tiny_model_cfg, tiny_tokenizer, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("adapter") / "adapter"
    train = OmegaConf.create({"method": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "bias": "none"}})
    model = apply_training_method(load_model(tiny_model_cfg), train, tiny_model_cfg)
    model.save_pretrained(str(dst), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(dst))
    return dst


def _log(tmp_path, model_cfg, adapter_dir) -> tuple[MlflowClient, str, object]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    ref = dict(base_reference(model_cfg), context_length=512, method="lora")
    with mlflow.start_run(experiment_id=mlflow.create_experiment("m", artifact_location=str(tmp_path / "art"))) as run:
        mlflow.log_params({"train.method": "lora", "train.learning_rate_multiplier": 2.0, "data.train_file": "t.jsonl"})
        mlflow.set_tags({"phitune.valid_digest": "ab" * 32, "phitune.model": "tiny-phi3"})
        for step, loss in ((3, 3.0), (7, 2.5)):
            mlflow.log_metrics({"full_valid_loss": loss, "perplexity": 2.718 ** loss}, step=step)
        info = log_chat_model(ref, adapter_dir)
    mlflow.set_tracking_uri(None)
    return MlflowClient(uri), run.info.run_id, info


def _download(info, tmp_path) -> Path:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # MLflow's models:/ repository reads this one
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{info.model_id}",
                                                        dst_path=str(tmp_path / "model")))
    finally:
        mlflow.set_tracking_uri(None)


def load_in_fresh_process(model_dir: Path, tmp_path: Path, script: str = LOAD_AND_CHAT) -> dict:
    """pip-install the model's phitune wheel (offline, no deps) into tmp_path/site and run `script`
    on the model folder from tmp_path/elsewhere, with no MLFLOW_* settings; its last stdout line as JSON."""
    (wheel,) = (model_dir / "artifacts").glob("phitune-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(site), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    proc = subprocess.run([sys.executable, "-c", script, str(model_dir)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def logged(tiny_model_cfg, adapter, tmp_path_factory) -> dict:
    """The builtin tiny model's adapter logged into a run, and the model folder downloaded."""
    tmp = tmp_path_factory.mktemp("logged")
    client, run_id, info = _log(tmp, tiny_model_cfg, adapter)
    return {"client": client, "run_id": run_id, "info": info, "dir": _download(info, tmp)}


def test_requirements_pin_pypi_versions_and_name_the_phitune_wheel(logged):
    model_dir = logged["dir"]
    lines = [ln for ln in (model_dir / "requirements.txt").read_text().splitlines() if ln.strip()]
    assert not [ln for ln in lines if "+" in ln], lines  # torch==2.13.0+cpu is not on PyPI
    pins = {Requirement(ln).name: str(Requirement(ln).specifier) for ln in lines if not ln.startswith("./")}
    assert {"torch", "transformers", "peft", "mlflow"} <= set(pins) and all(s.startswith("==") for s in pins.values())
    assert [ln for ln in lines if ln.startswith("./")] == ["./artifacts/phitune-0.1.0-py3-none-any.whl"]
    assert (model_dir / "artifacts/phitune-0.1.0-py3-none-any.whl").is_file()


def test_base_reference_is_portable_and_the_card_says_what_it_is(logged):
    model_dir, run_id = logged["dir"], logged["run_id"]
    base = json.loads((model_dir / "artifacts/base.json").read_text())
    assert base["builtin"] == "tiny-phi3" and base["builtin_version"].startswith("tiny-phi3-v")
    assert not base.get("path") and not base.get("local_path")  # no folder of this machine
    card = (model_dir / "artifacts/README.md").read_text()
    assert "phitune's builtin `tiny-phi3`" in card and "| `full_valid_loss` | 2.5 |" in card
    assert f"phitune serve runs:/{run_id}/model" in card and "`train.learning_rate_multiplier` | 2.0" in card


def test_the_logged_model_carries_the_runs_final_metrics(logged):
    client, run_id = logged["client"], logged["run_id"]
    (found,) = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id])
    assert found.model_id == logged["info"].model_id
    assert {m.key: (m.value, m.step) for m in found.metrics} == {"full_valid_loss": (2.5, 7),
                                                                 "perplexity": (pytest.approx(2.718 ** 2.5), 7)}
    assert [m.step for m in client.get_metric_history(run_id, "full_valid_loss")] == [3, 7]  # run history as it was


def test_a_fresh_interpreter_elsewhere_loads_it_with_the_shipped_phitune_and_chats(logged, tmp_path):
    out = load_in_fresh_process(logged["dir"], tmp_path)
    assert out["phitune"].startswith(str(tmp_path / "site")) and out["cwd"] == str(tmp_path / "elsewhere")
    assert out["role"] == "assistant" and isinstance(out["reply"], str)


def test_pip_resolves_the_requirements_from_the_package_index(logged, tmp_path):
    """What MLflow's virtualenv manager runs in the model folder, as a dry run (resolution, no install)."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "-r", "requirements.txt"], cwd=logged["dir"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert found["phitune"] == "0.1.0" and found["torch"].split("+")[0] == "2.13.0" and "omegaconf" in found


def test_a_base_folder_without_hub_id_ships_with_the_model(tiny_model_cfg, tiny_model_dir, adapter, tmp_path):
    folder = tmp_path / "my-base"
    shutil.copytree(tiny_model_dir, folder)
    cfg = OmegaConf.merge(tiny_model_cfg, {"builtin": None, "path": str(folder)})
    _, _, info = _log(tmp_path, cfg, adapter)
    model_dir = _download(info, tmp_path)
    base = json.loads((model_dir / "artifacts/base.json").read_text())
    assert base["shipped"] == "base_model" and "path" not in base and base["local_path"] == str(folder)
    assert (model_dir / "artifacts/base_model/model.safetensors").is_file()
    shutil.rmtree(folder)  # the training machine's folder is gone: the shipped copy must be what loads
    assert load_in_fresh_process(model_dir, tmp_path)["role"] == "assistant"

    from phitune.models.uri import read_pyfunc_model

    ref, adapter_dir, _ = read_pyfunc_model(model_dir, "folder")
    assert ref["path"] == str(model_dir / "artifacts/base_model") and Path(adapter_dir).is_dir()


def test_a_hub_model_trained_from_a_local_copy_records_the_hub_id(tiny_model_cfg, tiny_model_dir):
    from phitune.tracking.pyfunc_model import localize_base, portable_base

    ref = dict(base_reference(OmegaConf.merge(tiny_model_cfg, {"builtin": None, "path": str(tiny_model_dir),
                                                                "hub_id": "microsoft/Phi-3-mini-4k-instruct"})))
    base, ship = portable_base(ref)
    assert ship is None and "path" not in base and base["hub_id"] == "microsoft/Phi-3-mini-4k-instruct"
    assert localize_base(base)["path"] == str(tiny_model_dir)  # the copy is used where it exists
    gone = dict(base, local_path="/nonexistent/phi3")
    assert "path" not in localize_base(gone)  # elsewhere: the Hub id


def test_each_kept_epoch_and_the_final_model_are_logged_models_with_their_metrics(tmp_path_factory):
    """MLflow's Models tab: the real tiny run's two kept epochs and its final model, each with its metrics."""
    from test_eval import real_run

    real = real_run(tmp_path_factory)
    client = MlflowClient(real["uri"])
    run = client.get_run(real["run_id"])
    models = {m.name: m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])}
    assert {"model", "checkpoint-epoch-001", "checkpoint-epoch-002"} <= set(models)
    history = {m.step: m.value for m in client.get_metric_history(real["run_id"], "full_valid_loss")}
    for epoch in (1, 2):
        model = models[f"checkpoint-epoch-{epoch:03d}"]
        got = {m.key: (m.value, m.step) for m in model.metrics}
        value, step = got["full_valid_loss"]
        assert got["epoch"][0] == epoch and history[step] == value and "perplexity" in got
        assert model.tags["phitune.files"] == f"runs:/{real['run_id']}/checkpoints/epoch-{epoch:03d}"
        assert model.source_run_id == real["run_id"] and model.params["model.name"] == "tiny-phi3"
    assert models["checkpoint-epoch-001"].metrics[0].step < models["checkpoint-epoch-002"].metrics[0].step
    final = {m.key: m.value for m in models["model"].metrics}
    # every final metric of the run, not only those at its step (evaluate_at_end's eval_* come after the model)
    assert {k for k in run.data.metrics if not k.startswith("eval_")} <= set(final)
    assert {"train_runtime_s", "train_loss", "perplexity", "full_valid_mean_token_accuracy"} <= set(final)
    assert final["full_valid_loss"] == run.data.metrics["full_valid_loss"]
    # ranked by MLflow itself, as its Models tab does
    ranked = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string="metrics.full_valid_loss < 100",
                                         order_by=[{"field_name": "metrics.full_valid_loss", "ascending": True}])
    assert {m.name for m in ranked} >= {"model", "checkpoint-epoch-001", "checkpoint-epoch-002"}
