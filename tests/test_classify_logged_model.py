"""The classifier's MLflow model stands on its own, as the chat model's does (test_logged_model):
PyPI-pinned requirements, phitune's wheel inside it, the base folder shipped, a model card.

An untrained LoRA classifier on a copy of the tiny Phi-3 folder (no Hub id, so it must
ship) is logged into a fresh sqlite store; the model folder is downloaded, then the base
folder, the adapter folder and the store's artifacts are deleted, and a fresh interpreter,
in another directory with phitune imported from the model's wheel, loads it and classifies.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf
from packaging.requirements import Requirement

from phitune.classify.pyfunc import log_classifier_model
from phitune.modeling.loader import base_reference
from test_logged_model import _download, load_in_fresh_process

LABELS = ["billing", "shipping", "technical"]
LOAD_AND_CLASSIFY = """
import json, os, sys
import mlflow, pandas as pd, phitune
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"input": ["I was charged twice this month"]}))
print(json.dumps({"phitune": phitune.__file__, "label": out["label"][0], "scores": json.loads(out["scores"][0])}))
"""


@pytest.fixture(scope="module")
def logged(tiny_model_cfg, tiny_model_dir, tiny_tokenizer, tmp_path_factory) -> dict:
    from phitune.classify.model import build_classifier
    from phitune.config import TrainConfig

    tmp = tmp_path_factory.mktemp("clf-logged")
    base = tmp / "my-base"
    shutil.copytree(tiny_model_dir, base)
    model_cfg = OmegaConf.merge(tiny_model_cfg, {"builtin": None, "path": str(base)})
    torch.manual_seed(0)
    clf = build_classifier(model_cfg, OmegaConf.structured(TrainConfig), LABELS, tiny_tokenizer.pad_token_id)
    adapter = tmp / "adapter"
    clf.save_pretrained(str(adapter), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(adapter))
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    try:
        with mlflow.start_run(experiment_id=mlflow.create_experiment("c", artifact_location=str(tmp / "art"))) as run:
            mlflow.log_params({"train.method": "lora", "data.train_file": "tickets.jsonl"})
            mlflow.log_metrics({"full_valid_macro_f1": 0.75, "full_valid_loss": 0.5}, step=9)
            ref = dict(base_reference(model_cfg), context_length=512, method="lora")
            info = log_classifier_model(ref, adapter)
    finally:
        mlflow.set_tracking_uri(None)
    model_dir = _download(info, tmp)
    return {"dir": model_dir, "base": base, "adapter": adapter, "art": tmp / "art", "run_id": run.info.run_id}


def test_requirements_pin_pypi_versions_and_name_the_phitune_wheel(logged):
    lines = [ln for ln in (logged["dir"] / "requirements.txt").read_text().splitlines() if ln.strip()]
    assert not [ln for ln in lines if "+" in ln], lines  # torch==2.13.0+cpu is not on PyPI
    pins = {Requirement(ln).name: str(Requirement(ln).specifier) for ln in lines if not ln.startswith("./")}
    assert {"torch", "transformers", "peft", "mlflow"} <= set(pins) and all(s.startswith("==") for s in pins.values())
    (wheel_line,) = [ln for ln in lines if ln.startswith("./")]
    assert (logged["dir"] / wheel_line).is_file() and wheel_line.endswith("-py3-none-any.whl")


def test_base_is_shipped_not_an_absolute_path_and_the_card_says_classifier(logged):
    base = json.loads((logged["dir"] / "artifacts/base.json").read_text())
    assert "path" not in base and base["shipped"] == "base_model" and base["task"] == "classification"
    assert (logged["dir"] / "artifacts/base_model/model.safetensors").is_file()
    assert json.loads((logged["dir"] / "artifacts/adapter/labels.json").read_text())["labels"] == LABELS
    card = (logged["dir"] / "artifacts/README.md").read_text()
    assert card.count("A classifier: the folder shipped in `artifacts/base_model/`") == 1
    assert "| `full_valid_macro_f1` | 0.75 |" in card and "/v1/classifications" in card


def test_loads_and_classifies_elsewhere_after_the_original_folders_are_deleted(logged, tmp_path):
    for folder in (logged["base"], logged["adapter"], logged["art"]):  # nothing of the training side is left
        shutil.rmtree(folder)
    out = load_in_fresh_process(logged["dir"], tmp_path, LOAD_AND_CLASSIFY)
    assert out["phitune"].startswith(str(tmp_path / "site"))  # the shipped phitune, not the source tree
    assert out["label"] in LABELS and set(out["scores"]) == set(LABELS)
    assert sum(out["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_serve_reads_the_shipped_base_too(logged):
    from phitune.models.uri import read_pyfunc_model

    ref, adapter_dir, _ = read_pyfunc_model(Path(logged["dir"]), "folder")
    assert ref["path"] == str(logged["dir"] / "artifacts/base_model") and Path(adapter_dir).is_dir()
