"""Parallel sweep trials on a multi-GPU box (one GPU each), and a trial that runs out of GPU memory."""
from __future__ import annotations

import collections

import pytest
from optuna.trial import TrialState

from phitune.errors import PhituneError
from phitune.sweep import devices
from sweep_app.harness import load_study, make_stores, run, runs, toy_cmd

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def test_visible_devices_follow_cuda_visible_devices_else_the_count():
    assert devices.visible_devices(None, 4) == ["0", "1", "2", "3"]
    assert devices.visible_devices("2,3", 8) == ["2", "3"]
    assert devices.visible_devices("GPU-5a1c,GPU-77e0", 0) == ["GPU-5a1c", "GPU-77e0"]
    assert devices.visible_devices("", 4) == [] and devices.visible_devices("-1", 4) == []


def test_parallel_trials_get_one_gpu_each_and_never_more_trials_than_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "gpu_count", lambda: 4)  # a faked 4-GPU box
    assert devices.for_sweep(4, JOBLIB, "auto") == ["0", "1", "2", "3"]
    assert devices.assign(3, ["0", "1", "2", "3"]) == ["0", "1", "2"]
    with pytest.raises(PhituneError, match=r"hydra.launcher.n_jobs=5: .* shows 4 .* at most 4"):
        devices.for_sweep(5, JOBLIB, "auto")
    assert devices.for_sweep(8, BASIC, "auto") is None  # one trial at a time: nothing to place
    assert devices.for_sweep(1, JOBLIB, "auto") is None
    assert devices.for_sweep(4, JOBLIB, "cpu") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert devices.for_sweep(2, JOBLIB, "cuda") == ["4", "6"]
    with pytest.raises(PhituneError, match="shows 2"):
        devices.for_sweep(3, JOBLIB, "cuda")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)
    assert devices.for_sweep(4, JOBLIB, "auto") is None  # a CPU box: the trials run on its cores


def test_a_worker_process_holds_one_gpu_and_no_two_processes_share_one(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.ENV_DEVICES, "0,1")
    monkeypatch.setenv(devices.ENV_LOCKS, str(tmp_path / "locks"))
    held = []
    saved = dict(devices._HELD)
    try:
        for proposed in ("1", "1", "0"):  # each pass plays a fresh worker process
            devices._HELD.clear()
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", proposed)
            if len(held) < 2:
                held.append((devices.bind(), dict(devices._HELD)))
                assert devices.bind() == held[-1][0]  # the same process's next trial: the same GPU
            else:
                with pytest.raises(PhituneError, match=r"every GPU of this sweep \(0,1\) is held"):
                    devices.bind()
        assert [gpu for gpu, _ in held] == ["1", "0"]  # the proposal when free, else the free one
    finally:
        for _, h in held:
            h["lock"].close()
        devices._HELD.clear()
        devices._HELD.update(saved)
    monkeypatch.delenv(devices.ENV_DEVICES)
    assert devices.bind() is None  # outside a placed sweep


@pytest.mark.slow
def test_joblib_trials_each_see_one_gpu_of_a_faked_two_gpu_box(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what the sweeper reads; nothing here starts CUDA
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=4",
                      "hydra.sweeper.plots=false", "toy.sleep_s=0.3"), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sweep: 2 trials at once, one GPU each (CUDA_VISIBLE_DEVICES from 0,1)" in res.stdout
    seen = [line.split()[1:] for line in s.trace_lines() if line.startswith("device ")]
    assert len(seen) == 4 and {gpu for _, _, gpu in seen} == {"0", "1"}
    by_pid = collections.defaultdict(set)
    for _, pid, gpu in seen:
        by_pid[pid].add(gpu)
    assert all(len(g) == 1 for g in by_pid.values())  # a worker keeps its GPU from trial to trial
    for batch in (seen[0:2], seen[2:4]):  # trials 0,1 then 2,3 ran at the same time
        assert {gpu for _, _, gpu in batch} == {"0", "1"}
    # n_jobs above the GPU count: refused before any trial
    r = run(toy_cmd(*s.overrides(), "hydra/launcher=joblib", "hydra.launcher.n_jobs=3"), timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: hydra.launcher.n_jobs=3: parallel trials each take one GPU and this machine shows 2" in r.stderr
    assert len(load_study(s).get_trials()) == 4


@pytest.mark.slow
def test_an_out_of_memory_trial_fails_with_the_memory_settings_and_the_sweep_goes_on(tmp_path):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=3", "toy.oom_trials=[1]", "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    error = trials[1].user_attrs["error"]
    assert error == ("out of GPU memory: lower train.max_device_tokens (tokens per forward pass) or set "
                     "train.gradient_checkpointing=true (OutOfMemoryError: CUDA out of memory)")
    assert [line for line in res.stdout.splitlines() if "trial 1 failed" in line] == [f"  trial 1 failed: {error}"]
    assert "trial 3/3 · best full_valid_loss" in res.stdout and "· 1 failed" in res.stdout
    _, children = runs(s)
    failed = [c for c in children if c.data.tags["phitune.trial_number"] == "1"][0]
    assert failed.info.status == "FAILED" and failed.data.tags["phitune.trial_state"] == "failed"
