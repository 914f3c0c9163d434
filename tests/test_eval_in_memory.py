"""train.evaluate_at_end scores the run's model as it is in memory: no second download and load,
and the teacher-forced loss in chunks of train.loss_chunk_tokens (no [tokens, vocab] logits)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small for intra-op threads (tests/test_eval.py)
    yield
    torch.set_num_threads(threads)


def test_end_of_run_evaluation_uses_the_model_in_memory_and_chunks_the_loss(tmp_path, monkeypatch, one_thread):
    import mlflow
    from mlflow.tracking import MlflowClient

    from phitune import recipe
    from phitune.data.dataset import prepare_splits
    from phitune.evaluation import run as ev
    from phitune.evaluation.suite import teacher_forced
    from phitune.modeling.loader import apply_training_method, load_model, load_tokenizer
    from phitune.train import loop

    valid = tmp_path / "valid.jsonl"
    valid.write_text("\n".join((REPO / "data/support_valid.jsonl").read_text().splitlines()[:6]) + "\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _compose([f"data.train_file={REPO / 'data/support_train.jsonl'}", f"data.validation_file={valid}",
                    f"tracking.uri={uri}", "eval.generation_limit=2", "eval.max_new_tokens=4"])
    model = apply_training_method(load_model(cfg.model), cfg.train, cfg.model)
    model.train()
    tokenizer = load_tokenizer(cfg.model)
    spec = loop.LoopSpec(epochs=1, plan=None, seed=0, loss_chunk_tokens=16)
    chunks, real = [], loop.forward_stats

    def spy(m, batch, loss_chunk_tokens=None, autocast=None):
        chunks.append(loss_chunk_tokens)
        return real(m, batch, loss_chunk_tokens, autocast)

    monkeypatch.setattr(loop, "forward_stats", spy)
    monkeypatch.setattr(ev, "score", lambda *a, **k: pytest.fail("the run's model was loaded again"))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    metrics = ev.evaluate_run(cfg, run_id, trained=(model, tokenizer, recipe._base_ref(cfg)), spec=spec,
                              splits=prepare_splits(cfg.data))
    assert metrics is not None and chunks and set(chunks) == {16}
    monkeypatch.setattr(loop, "forward_stats", real)
    convs = [ex.messages for ex in prepare_splits(cfg.data).valid]
    full = teacher_forced(model, tokenizer, convs, 512, 8, model.device)  # full logits, the same model
    assert metrics["loss"] == pytest.approx(full["loss"], rel=1e-5) and metrics["examples"] == 6
    logged = MlflowClient(uri).get_run(run_id).data
    assert logged.metrics["eval_loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert logged.metrics["eval_generated"] == 2
    assert logged.tags["phitune.eval_model_uri"] == f"runs:/{run_id}/model"  # what it scored, as when reloaded
    assert model.training and model.config.use_cache is False  # handed back as training left it
