"""A run's life on disk and in MLflow: killed anywhere, resumed, nothing lost, nothing left RUNNING."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from phitune.train.checkpoint import checkpoint_dirs
from test_train_run import REPO, _cmd, compose, run_overrides, small_data  # noqa: F401 (fixture)


def _runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("phitune")
    return client.search_runs([exp.experiment_id]) if exp is not None else []


def _first_step_logged(root: Path) -> bool:
    try:
        runs = _runs(root)
        client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
        return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "train_loss"))
    except Exception:  # the store is being created or written by the run: ask again
        return False


def _steps(root: Path, run_id: str, metric: str) -> list[int]:
    return [m.step for m in MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db").get_metric_history(run_id, metric)]


def test_a_run_sigkilled_before_its_first_checkpoint_resumes_in_the_same_mlflow_run(tmp_path, small_data):
    # 48 examples / 1 per step = 48 optimizer steps before the first checkpoint: time to kill it
    extra = ("train.epochs=1", "model.base_batch_size=1", "train.eval_steps=0", "train.full_eval_each_epoch=false",
             "tracking.log_model=false")
    proc = subprocess.Popen(_cmd(tmp_path, *small_data, *extra), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _first_step_logged(tmp_path):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first step was logged"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler runs: the MLflow run stays RUNNING
    proc.wait(timeout=60)
    assert not checkpoint_dirs(tmp_path / "ckpt"), "the run reached its checkpoint before it was killed"
    (killed,) = _runs(tmp_path)
    assert killed.info.status == "RUNNING"
    assert json.loads((tmp_path / "ckpt" / "run.json").read_text())["run_id"] == killed.info.run_id

    r = subprocess.run(_cmd(tmp_path, *small_data, *extra, "resume=true"), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (resumed,) = _runs(tmp_path)  # one run: the killed one, continued from step 0
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    assert _steps(tmp_path, resumed.info.run_id, "train_loss") == list(range(1, 49))  # one point per step


@pytest.mark.parametrize("where", ["logging", "publishing"])
def test_a_run_killed_at_an_epoch_end_loses_no_epoch_in_mlflow(tmp_path, small_data, monkeypatch, where):
    """Killed while epoch 2's metrics and checkpoint go to MLflow, or as its checkpoint is
    published: after resume=true, both epochs are in the run once and promote sees both."""
    from phitune.recipe import run
    from phitune.registry.promote import candidates
    from phitune.tracking.run import TrackedRun

    overrides = run_overrides(tmp_path, *small_data, "tracking.log_model=false")  # 2 epochs x 6 steps
    if where == "logging":
        logged = TrackedRun.on_epoch_end

        def on_epoch_end(self, epoch, step, metrics, checkpoint_dir):
            if epoch == 2:
                raise KeyboardInterrupt  # Ctrl-C before anything of epoch 2 reached MLflow
            logged(self, epoch, step, metrics, checkpoint_dir)

        monkeypatch.setattr(TrackedRun, "on_epoch_end", on_epoch_end)
    else:
        replace = os.replace

        def publish(src, dst, *args, **kwargs):
            if Path(src).name.startswith(".tmp-epoch-002"):
                raise KeyboardInterrupt  # Ctrl-C just before epoch 2's folder gets its final name
            return replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", publish)
    with pytest.raises(KeyboardInterrupt):
        run(compose(overrides))
    monkeypatch.undo()
    (killed,) = _runs(tmp_path)
    assert killed.info.status == "KILLED"
    assert _steps(tmp_path, killed.info.run_id, "train_loss")[-1] == 12, "killed before its last step: proves less"

    run(compose(overrides + ["resume=true"]))
    (done,) = _runs(tmp_path)
    rid = done.info.run_id
    assert rid == killed.info.run_id and done.info.status == "FINISHED"
    assert _steps(tmp_path, rid, "train_loss") == list(range(1, 13))  # one point per step, not two
    assert _steps(tmp_path, rid, "full_valid_loss") == [6, 12]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert {a.path for a in client.list_artifacts(rid, "checkpoints")} == {"checkpoints/epoch-001", "checkpoints/epoch-002"}
    assert "checkpoints/epoch-002/adapter_model.safetensors" in {a.path for a in client.list_artifacts(rid, "checkpoints/epoch-002")}
    cands = candidates(client, [client.get_run(rid)], "full_valid_loss", "best", tmp_path / "promote")
    assert sorted(c.checkpoint for c in cands) == ["epoch-001", "epoch-002"]
    assert [d.name for d in checkpoint_dirs(tmp_path / "ckpt")] == ["epoch-001", "epoch-002"]
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


def test_resume_removes_the_partial_checkpoints_of_a_killed_run(tmp_path):
    from phitune.recipe import _prepare_output_dir

    out = tmp_path / "ckpt"
    (out / "epoch-001").mkdir(parents=True)
    (out / "epoch-001" / "state.json").write_text("{}")
    (out / ".tmp-epoch-002-4242" / "adapter").mkdir(parents=True)  # another process was killed while saving
    assert _prepare_output_dir(out, resume=True) == out / "epoch-001"
    assert sorted(p.name for p in out.iterdir()) == ["epoch-001"]
