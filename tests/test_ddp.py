"""Two gloo processes on CPU train like one process with the same effective batch."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from test_train_run import REPO, run_overrides, small_data  # noqa: F401 (fixture)


def test_torchrun_two_processes_match_one(tmp_path, small_data):
    # dropout 0: each rank would otherwise draw its own dropout masks.
    extra = ["train.epochs=1", "train.lora.dropout=0.0", "tracking.log_model=false", "model.base_batch_size=8"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "train.py", *run_overrides(one, *small_data, *extra), f"hydra.run.dir={one}/h"],
                   cwd=REPO, check=True, capture_output=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "train.py",
                        *run_overrides(two, *small_data, *extra), f"hydra.run.dir={two}/h"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{two}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("phitune").experiment_id])
    assert run.info.status == "FINISHED"
    # 8 examples per step = 4 per device x 2 devices, no accumulation
    assert run.data.params["derived.world_size"] == "2" and run.data.params["derived.device_batch"] == "4"
    a = load_file(str(one / "ckpt" / "epoch-001" / "trainable.safetensors"))
    b = load_file(str(two / "ckpt" / "epoch-001" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same math, different summation order: equal to float32 round-off
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3)
    losses1 = [m.value for m in MlflowClient(f"sqlite:///{one}/mlruns/mlflow.db").get_metric_history(
        _only_run(one), "train_loss")]
    losses2 = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    torch.testing.assert_close(torch.tensor(losses1), torch.tensor(losses2), atol=1e-3, rtol=1e-4)


def test_torchrun_resume_gives_each_rank_its_own_rng_back(tmp_path, small_data):
    """LoRA dropout draws from each rank's generator: resumed at epoch 1, a 2-process run
    ends with the weights of the uninterrupted one only if every rank got its own state back."""
    extra = ["train.epochs=2", "train.lora.dropout=0.1", "tracking.log_model=false", "model.base_batch_size=8"]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "train.py", *run_overrides(tmp_path, *small_data, *extra),
           f"hydra.run.dir={tmp_path}/h"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    rank0, rank1 = (load_file(str(ckpt / "epoch-001" / f"rng-rank{r}.safetensors"))["torch"] for r in (0, 1))
    assert not torch.equal(rank0, rank1), "the ranks' generators agree: the test could not tell them apart"
    uninterrupted = load_file(str(ckpt / "epoch-002" / "trainable.safetensors"))
    shutil.rmtree(ckpt / "epoch-002")  # as if killed during epoch 2

    r = subprocess.run(cmd + ["resume=true"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    resumed = load_file(str(ckpt / "epoch-002" / "trainable.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k


def _only_run(root: Path) -> str:
    c = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    (run,) = c.search_runs([c.get_experiment_by_name("phitune").experiment_id])
    return run.info.run_id
