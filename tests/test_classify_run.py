"""python train.py task=classification end to end on the tiny Phi-3 and the sample tickets:
the metrics the task names in MLflow, the end-of-run report, the logged classifier."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def compose(overrides):
    from hydra import compose as hcompose, initialize_config_dir

    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    """One 2-epoch run on data/tickets_* (106 optimizer steps)."""
    from phitune.recipe import run

    tmp = tmp_path_factory.mktemp("classify")
    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    cfg = compose(["task=classification", f"data.train_file={REPO}/data/tickets_train.jsonl",
                   f"data.validation_file={REPO}/data/tickets_valid.jsonl", f"tracking.uri={uri}",
                   f"train.output_dir={tmp}/ckpt", "train.epochs=2", "train.eval_steps=25", "train.progress=false"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1.6M-parameter model: thread hand-offs cost more than they save
    try:
        objective = run(cfg)
    finally:
        torch.set_num_threads(threads)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)  # not a registry URI an earlier test left set
    (r,) = client.search_runs([client.get_experiment_by_name("phitune").experiment_id])
    return {"objective": objective, "run": r, "client": client, "tmp": tmp, "uri": uri}


def test_objective_is_the_final_macro_f1_and_clearly_beats_the_majority_class(classified):
    m = classified["run"].data.metrics
    assert classified["objective"] == pytest.approx(m["full_valid_macro_f1"])
    valid = [json.loads(line)["label"] for line in (REPO / "data/tickets_valid.jsonl").read_text().splitlines()]
    majority = Counter(valid).most_common(1)[0][1] / len(valid)  # accuracy of always answering the commonest label
    majority_f1 = (2 * majority / (1 + majority)) / len(set(valid))  # its macro-F1: one class right, the others 0
    assert m["full_valid_accuracy"] > majority + 0.2, m
    assert m["full_valid_macro_f1"] > 4 * majority_f1, m


def test_the_tasks_metrics_per_step_per_evaluation_and_at_the_end(classified):
    client, r = classified["client"], classified["run"]
    m = r.data.metrics
    for name in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_macro_f1",
                 "full_valid_loss", "full_valid_accuracy", "full_valid_macro_f1"):
        assert name in m, name
    assert "train_mean_token_accuracy" not in m and "perplexity" not in m
    assert len(client.get_metric_history(r.info.run_id, "train_accuracy")) == 106
    assert [p.step for p in client.get_metric_history(r.info.run_id, "valid_macro_f1")] == [25, 50, 75, 100]
    assert len(client.get_metric_history(r.info.run_id, "full_valid_macro_f1")) == 2  # per epoch
    for label in ("billing", "shipping", "feature_request"):
        for kind in ("precision", "recall", "f1"):
            assert 0.0 <= m[f"full_valid_{kind}_{label}"] <= 1.0
    assert r.data.tags["phitune.task"] == "classification"


def test_report_confusion_matrix_results_csv_and_labels_are_logged(classified):
    client, run_id = classified["client"], classified["run"].info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"full_valid_confusion_matrix.png", "full_valid_classification_report.json", "results.csv"} <= names
    png = Path(client.download_artifacts(run_id, "full_valid_confusion_matrix.png", str(classified["tmp"])))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_text = Path(client.download_artifacts(run_id, "results.csv", str(classified["tmp"]))).read_text()
    assert csv_text.splitlines()[0] == ("step,train_loss,train_accuracy,valid_loss,valid_accuracy,valid_macro_f1,"
                                        "full_valid_loss,full_valid_accuracy,full_valid_macro_f1")
    labels = json.loads(Path(client.download_artifacts(run_id, "adapter/labels.json", str(classified["tmp"]))).read_text())
    assert labels["labels"] == sorted({json.loads(x)["label"] for x in
                                       (REPO / "data/tickets_train.jsonl").read_text().splitlines()})
    ckpts = sorted((classified["tmp"] / "ckpt").glob("epoch-*"))
    assert ckpts and (ckpts[-1] / "adapter" / "labels.json").is_file()


def test_logged_pyfunc_predicts_labels_and_probabilities(classified):
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"runs:/{classified['run'].info.run_id}/model")
    out = model.predict(pd.DataFrame({"input": ["I was charged twice for invoice INV-12345 this month.",
                                                json.dumps([{"role": "user", "content": "Where is my order #123456?"}])]}))
    assert list(out.columns) == ["label", "scores"] and len(out) == 2
    scores = json.loads(out["scores"][0])
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5) and out["label"][0] == max(scores, key=scores.get)


def _promote(classified, capsys, *args):
    from phitune.cli import main

    rc = main(["promote", "--tracking-uri", classified["uri"], "--run", classified["run"].info.run_id, *args])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    return out


def _classifies(uri: str) -> None:
    import pandas as pd

    out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"input": ["Where is my order #123456?"]}))
    scores = json.loads(out["scores"][0])
    assert out["label"][0] in scores and sum(scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_promote_registers_a_kept_epochs_classifier_that_loads_and_classifies(classified, capsys, tmp_path):
    """--checkpoint 1, best, last on the real run: the version is the epoch's own LoggedModel."""
    from phitune.classify.serving import load_classifier
    from phitune.models.uri import resolve

    client, rid, uri = classified["client"], classified["run"].info.run_id, classified["uri"]
    mlflow.set_registry_uri(uri)
    out = _promote(classified, capsys, "--name", "tickets", "--checkpoint", "1")
    assert f"run {rid}, epoch-001" in out and "@champion -> tickets version 1" in out
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    models = {client.get_logged_model(o.model_id).name: o.model_id for o in run.outputs.model_outputs}
    # the files went into epoch 1's LoggedModel from training: no second model of that name
    assert sorted(models) == ["checkpoint-epoch-001", "checkpoint-epoch-002", "model"]
    assert len(run.outputs.model_outputs) == 3
    v1 = client.get_model_version("tickets", "1")
    assert v1.source == f"models:/{models['checkpoint-epoch-001']}" and v1.tags["phitune.checkpoint"] == "epoch-001"
    e1 = json.loads((sorted((classified["tmp"] / "ckpt").glob("epoch-001"))[0] / "state.json").read_text())
    assert float(v1.tags["metric.full_valid_macro_f1"]) == pytest.approx(e1["epoch_metrics"][0]["full_valid_macro_f1"])
    _classifies("models:/tickets/1")
    served = load_classifier(resolve("models:/tickets@champion", uri, tmp_path / "m"))  # what phitune serve loads
    assert served is not None and served.labels == json.loads(
        (classified["tmp"] / "ckpt" / "epoch-001" / "adapter" / "labels.json").read_text())["labels"]

    final = run.data.metrics["full_valid_macro_f1"]
    out = _promote(classified, capsys, "--name", "tickets", "--checkpoint", "best")
    assert "best of 2 candidate(s) by full_valid_macro_f1 (higher is better)" in out
    best = "1" if float(v1.tags["metric.full_valid_macro_f1"]) > final else "2"  # a tie: the final model (first)
    assert str(client.get_registered_model("tickets").aliases["champion"]) == best

    out = _promote(classified, capsys, "--name", "tickets-last", "--checkpoint", "last")
    assert f"run {rid}, final model" in out
    last = client.get_model_version("tickets-last", "1")
    assert last.source == f"models:/{models['model']}"
    _classifies("models:/tickets-last/1")
