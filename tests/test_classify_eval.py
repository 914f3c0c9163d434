"""`phitune eval` on a classifier: labelled data scored through the `classification` evaluate
module (accuracy, macro-F1, per-class figures, confusion matrix), printed and logged."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from phitune.cli import main

LABELS = ["billing", "shipping", "technical"]


@pytest.fixture(scope="module")
def adapter(tiny_model_cfg, tiny_tokenizer, tmp_path_factory):
    from phitune.classify.model import build_classifier
    from phitune.config import TrainConfig

    torch.manual_seed(0)
    model = build_classifier(tiny_model_cfg, OmegaConf.structured(TrainConfig), LABELS, tiny_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("clf") / "adapter"
    model.save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(folder))
    return folder


def _data(tmp_path, rows):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"text": "I was charged twice", "label": "billing"}, {"text": "where is my parcel", "label": "shipping"},
        {"messages": [{"role": "user", "content": "the app crashes"}], "label": "technical"},
        {"text": "wrong invoice amount", "label": "billing"}]


def test_eval_reports_and_logs_the_classification_scores(adapter, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = _data(tmp_path, ROWS)
    rc = main(["eval", str(adapter), "--data", str(data), "--model", "tiny-phi3", "--tracking-uri", uri,
               "--experiment", "evals", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0 and result["metrics"]["examples"] == 4
    assert "macro_f1" in out and "confusion matrix" in out and "technical" in out
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.data.tags["phitune.role"] == "eval" and run.data.tags["phitune.task"] == "classification"
    assert run.data.metrics["eval_accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert {"eval_macro_f1", "eval_precision_billing", "eval_recall_shipping", "eval_f1_technical"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} == {"eval/confusion_matrix.png",
                                                                                "eval/metrics.json"}
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/metrics.json", str(tmp_path))).read_text())
    assert sum(map(sum, report["confusion_matrix"])) == 4 and report["labels"] == LABELS


def test_a_label_the_model_does_not_know_is_a_located_error(adapter, tmp_path, capsys):
    data = _data(tmp_path, ROWS + [{"text": "gift card", "label": "gifts"}])
    rc = main(["eval", str(adapter), "--data", str(data), "--model", "tiny-phi3", "--no-log"])
    err = capsys.readouterr().err
    assert rc == 1 and f'{data}:5: label "gifts" is not in the labels of {adapter}' in err


def test_labelled_data_on_a_chat_model_says_so(tiny_model_dir, tmp_path, capsys):
    data = _data(tmp_path, ROWS)
    rc = main(["eval", str(tiny_model_dir), "--data", str(data), "--no-log"])
    assert rc == 1 and "is not a classifier" in capsys.readouterr().err
