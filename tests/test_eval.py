"""Evaluation on a real tiny run: at the end of training, `phitune eval`, eval.py, model URIs.

`real_run()` trains the tiny Phi-3 once per session (2 epochs on 48 examples, 12
validation conversations, train.evaluate_at_end=true); test_promote reuses it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from phitune.cli import main

REPO = Path(__file__).resolve().parents[1]
_REAL: dict = {}


def _subset(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("\n".join(src.read_text(encoding="utf-8-sig").splitlines()[:n]) + "\n", encoding="utf-8")
    return dst


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def real_run(tmp_path_factory) -> dict:
    """One finished training run with a logged model and two epoch checkpoints (cached per session)."""
    if not _REAL:
        from phitune.recipe import run

        tmp = tmp_path_factory.mktemp("real-run")
        train = _subset(REPO / "data/support_train.jsonl", tmp / "train.jsonl", 48)
        valid = _subset(REPO / "data/support_valid.jsonl", tmp / "valid.jsonl", 12)
        uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
        cfg = _compose([f"data.train_file={train}", f"data.validation_file={valid}", f"tracking.uri={uri}",
                        f"train.output_dir={tmp}/ckpt", "train.epochs=2", "train.eval_steps=3", "train.progress=false",
                        "train.evaluate_at_end=true",
                        "eval.generation_limit=4", "eval.max_new_tokens=16"])  # 4 greedy replies of <= 16 tokens
        import torch

        threads = torch.get_num_threads()
        # The tiny model's ops are too small for intra-op threads: one thread trained this run in
        # 41 s wall / 14 s CPU against 129 s / 53 s with two (a loaded 2-core box).
        torch.set_num_threads(1)
        try:
            run(cfg)
        finally:
            torch.set_num_threads(threads)
        client = MlflowClient(uri, registry_uri=uri)
        (r,) = client.search_runs([client.get_experiment_by_name("phitune").experiment_id])
        _REAL.update(tmp=tmp, uri=uri, run=r, run_id=r.info.run_id, train=train, valid=valid)
    return _REAL


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    return real_run(tmp_path_factory)


def _table(client, run_id, dst) -> dict:
    path = client.download_artifacts(run_id, "eval/generations.json", str(dst))
    return json.loads(Path(path).read_text())


def test_a_training_run_evaluates_itself_at_the_end(real, tmp_path):
    client = MlflowClient(real["uri"], registry_uri=real["uri"])
    run = client.get_run(real["run_id"])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and "phitune.eval_error" not in run.data.tags
    # the same model on the same validation data: the teacher-forced numbers are the training's own
    assert m["eval_loss"] == pytest.approx(m["full_valid_loss"], rel=1e-4)
    assert m["eval_mean_token_accuracy"] == pytest.approx(m["full_valid_mean_token_accuracy"], rel=1e-4)
    assert m["eval_perplexity"] == pytest.approx(m["perplexity"], rel=1e-3)
    assert m["eval_examples"] == 12 and m["eval_generated"] == 4  # eval.generation_limit=4
    for key in ("eval_exact_match", "eval_token_f1", "eval_rouge_l", "eval_bleu"):
        assert 0.0 <= m[key] <= 1.0, key
    assert run.data.tags["phitune.eval_digest"] == run.data.tags["phitune.valid_digest"]
    table = _table(client, real["run_id"], tmp_path)
    assert table["columns"][:3] == ["prompt", "reference", "prediction"]
    assert len(table["data"]) == 4
    refs = [json.loads(line)["messages"][-1]["content"] for line in real["valid"].read_text().splitlines()]
    assert [row[1] for row in table["data"]] == refs[:4]  # reference = the last assistant turn
    assert all(row[3] in ("stop", "length") for row in table["data"])  # finish_reason


def test_phitune_eval_logs_a_run_tagged_with_its_source(real, capsys, tmp_path):
    rc = main(["eval", f"runs:/{real['run_id']}/model", "--data", str(real["valid"]), "--limit", "4",
               "--generation-limit", "2", "--max-new-tokens", "8", "--tracking-uri", real["uri"], "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["source_run_id"] == real["run_id"]
    client = MlflowClient(real["uri"], registry_uri=real["uri"])
    ev = client.get_run(result["run_id"])
    assert ev.data.tags["phitune.eval_of"] == real["run_id"] and ev.data.tags["phitune.role"] == "eval"
    assert ev.info.experiment_id == real["run"].info.experiment_id  # beside the run it evaluates
    assert ev.data.metrics["eval_examples"] == 4 and ev.data.metrics["eval_generated"] == 2
    assert ev.data.metrics["eval_loss"] == pytest.approx(result["metrics"]["loss"])
    assert ev.data.params["eval.max_new_tokens"] == "8"
    assert [i.tags[0].value for i in ev.inputs.dataset_inputs] == ["evaluation"]
    table = _table(client, result["run_id"], tmp_path)
    assert len(table["data"]) == 2 and {"prompt", "reference", "prediction"} <= set(table["columns"])
    # an evaluation run is not a training run: compare leaves it out
    from phitune.registry.compare import leaderboard

    assert [r.run_id for r in leaderboard(client, experiment="phitune").rows] == [real["run_id"]]


def test_model_uris_resolve_to_base_and_adapter(real, tmp_path):
    from phitune.models.uri import resolve

    def resolve_model(uri, workdir):
        return resolve(uri, real["uri"], workdir)

    rid = real["run_id"]
    src = resolve_model(f"runs:/{rid}/model", tmp_path / "a")
    assert src.kind == "run-model" and src.run_id == rid and src.base_ref["name"] == "tiny-phi3"
    assert (Path(src.adapter_dir) / "adapter_config.json").is_file() and src.context_length == 512

    ckpt = resolve_model(f"runs:/{rid}/checkpoints/epoch-001", tmp_path / "b")
    assert ckpt.kind == "checkpoint" and ckpt.checkpoint == "epoch-001" and ckpt.base_ref["builtin"] == "tiny-phi3"
    assert (Path(ckpt.adapter_dir) / "adapter_model.safetensors").is_file()

    local = resolve_model(str(real["tmp"] / "ckpt" / "epoch-002"), tmp_path / "c")  # train.output_dir's folder
    assert local.kind == "checkpoint" and local.run_id == rid and local.adapter_dir.endswith("epoch-002/adapter")

    client = MlflowClient(real["uri"], registry_uri=real["uri"])
    client.create_registered_model("eval-uri")
    # the run's servable model (its kept epochs are file-less LoggedModels beside it)
    model_id = next(o.model_id for o in real["run"].outputs.model_outputs
                    if client.get_logged_model(o.model_id).name == "model")
    client.create_model_version("eval-uri", f"models:/{model_id}", run_id=rid, model_id=model_id)
    client.set_registered_model_alias("eval-uri", "champion", "1")
    reg = resolve_model("models:/eval-uri@champion", tmp_path / "d")
    assert (reg.kind, reg.model_name, reg.model_version, reg.run_id) == ("registered", "eval-uri", "1", rid)
    assert reg.resolved_uri == "models:/eval-uri/1"  # the alias pinned once, before the download
    # a kept epoch registered from MLflow's Models tab (a LoggedModel with no files): its checkpoint
    epoch = next(o.model_id for o in real["run"].outputs.model_outputs
                 if client.get_logged_model(o.model_id).name == "checkpoint-epoch-001")
    client.create_model_version("eval-uri", f"models:/{epoch}", run_id=rid, model_id=epoch)
    for uri, workdir in ((f"models:/{epoch}", "g"), ("models:/eval-uri/2", "h")):
        src = resolve_model(uri, tmp_path / workdir)
        assert src.checkpoint == "epoch-001" and src.run_id == rid and src.base_ref["builtin"] == "tiny-phi3"
        assert (Path(src.adapter_dir) / "adapter_model.safetensors").is_file()
    assert (src.kind, src.model_name, src.model_version) == ("registered", "eval-uri", "2")

    from phitune.errors import PhituneError

    with pytest.raises(PhituneError, match="no alias @nope on registered model 'eval-uri'"):
        resolve_model("models:/eval-uri@nope", tmp_path / "e")
    with pytest.raises(PhituneError, match="no such folder"):
        resolve_model(str(tmp_path / "missing"), tmp_path / "f")


def test_eval_py_validates_the_test_file_before_any_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                   '{"messages": "not a list"}\n')
    r = subprocess.run([sys.executable, str(REPO / "eval.py"), "model_uri=runs:/0123456789abcdef/model",
                        f"data.test_file={bad}", f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
                        f"hydra.run.dir={tmp_path}/hydra"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}:2:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing was looked up or logged


def test_split_conversation():
    from phitune.chat import split_conversation

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1", "weight": 0}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    prompt, reference = split_conversation(msgs)
    assert reference == "A2" and [m["content"] for m in prompt] == ["S", "Q1", "A1", "Q2"]
    assert all("weight" not in m for m in prompt)
    assert split_conversation([{"role": "user", "content": "Q"}]) is None
    assert split_conversation([{"role": "assistant", "content": "A"}]) is None  # nothing to answer
