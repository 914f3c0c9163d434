"""`python train.py -m` on the tiny Phi-3: the real job's side of the sweep contract."""
from __future__ import annotations

import pytest
from optuna.trial import TrialState

from sweep_app.harness import REPO, load_study, make_stores, run, runs

pytestmark = pytest.mark.slow


def _subset(src, dst, n):
    dst.write_text("\n".join(src.read_text(encoding="utf-8-sig").splitlines()[:n]) + "\n", encoding="utf-8")
    return dst


def test_three_trial_train_sweep_leaves_one_parent_and_three_children(tmp_path, tiny_model_dir):
    s = make_stores(tmp_path)
    train = _subset(REPO / "data/support_train.jsonl", tmp_path / "train.jsonl", 16)
    valid = _subset(REPO / "data/support_valid.jsonl", tmp_path / "valid.jsonl", 10)
    cmd = [str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python", str(REPO / "train.py"), "-m",
           f"hydra.sweeper.storage={s.optuna_url}", f"tracking.uri={s.mlflow_url}", f"hydra.sweep.dir={tmp_path}/multirun",
           f"data.train_file={train}", f"data.validation_file={valid}",
           "hydra.sweeper.n_trials=3", "hydra.sweeper.plots=false", "hydra.sweeper.pruner.name=none",
           "hydra.sweeper.pruner.report_every=0.1",  # of an epoch: a report before the last step
           "train.max_steps=2", "train.eval_steps=1", "train.progress=false", "tracking.log_model=false"]
    res = run(cmd, timeout=600, cwd=tmp_path)  # cwd: checkpoints/ land in tmp_path
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "trial 3/3 · best full_valid_loss" in res.stdout

    study = load_study(s, "phitune-default")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:
        assert t.intermediate_values, "the job reported valid_loss to its trial"
        assert t.user_attrs["train_tokens"] > 0
        assert set(t.params) == {"train.learning_rate_multiplier", "train.batch_size_multiplier", "train.epochs"}

    parents, children = runs(s, "phitune")
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_number = {int(c.data.tags["phitune.trial_number"]): c for c in children}
    assert sorted(by_number) == [0, 1, 2]
    for t in trials:
        child = by_number[t.number]
        assert child.info.status == "FINISHED" and child.data.tags["phitune.trial_state"] == "complete"
        assert child.data.metrics["full_valid_loss"] == pytest.approx(t.value)
        assert child.info.run_id == t.user_attrs["mlflow_run_id"]
    assert parents[0].data.metrics["best_full_valid_loss"] == pytest.approx(study.best_value)
