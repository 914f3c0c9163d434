"""phitune's sweeper under a cluster launcher: `hydra/launcher=submitit_local`, the twin of
`submitit_slurm` (same launcher class, local processes instead of sbatch), on the toy app.

Each trial is a submitit job in its own process: it reaches its trial (reports, pruning,
train_tokens) through the study's sqlite URL, and hands its return value back through
submitit's result file. A job starts a fresh Python (~5-25 s on a loaded 2-core box), so
the sweeps here run their trials at once (hydra.sweeper.n_jobs).
"""
from __future__ import annotations

import os
import signal
import time

import pytest
from optuna.trial import TrialState

from sweep_app.harness import load_study, make_stores, popen, run, runs, toy_cmd

pytestmark = pytest.mark.slow

SUBMITIT = ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.sweeper.plots=false")


def _starts(s) -> dict[int, int]:
    """trial number -> pid of the process that ran it, from the toy's trace."""
    return {int(n): int(pid) for _, n, pid in (line.split() for line in s.trace_lines() if line.startswith("start "))}


def _reported(s, number: int) -> bool:
    """Trial `number` has sent a report through the storage (its job is mid-run)."""
    if number not in _starts(s):
        return False
    trials = load_study(s).get_trials()
    return len(trials) > number and bool(trials[number].intermediate_values)


def test_submitit_local_sweep_completes_prunes_and_a_rerun_adds_nothing(tmp_path):
    s = make_stores(tmp_path)
    # Random sampler, seed 0 + N: first reports 1.021, 1.063 and 1.137; above 1.1 is pruned.
    cmd = toy_cmd(*s.overrides(), *SUBMITIT, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=3",
                  "hydra.sweeper.pruner.name=threshold", "hydra.sweeper.pruner.upper=1.1")
    res = run(cmd, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED], res.stdout
    assert trials[2].last_step == 1 and "trial 2 pruned at step 1 (last report 1.137)" in res.stdout
    # Written by the jobs themselves, through the storage URL: reports and tokens.
    assert [len(t.intermediate_values) for t in trials] == [4, 4, 1]
    assert [t.user_attrs["train_tokens"] for t in trials] == [400, 400, 100]
    starts = _starts(s)
    assert sorted(starts) == [0, 1, 2] and len(set(starts.values())) == 3  # three job processes
    assert (tmp_path / "multirun" / ".submitit").is_dir()  # submitit's own folder: it did launch them
    parents, children = runs(s)
    assert len(parents) == 1 and sorted(c.data.tags["phitune.trial_state"] for c in children) == \
        ["complete", "complete", "pruned"]

    again = run(cmd, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3/3 trials done (resumed)" in again.stdout
    assert len(load_study(s).get_trials()) == 3 and _starts(s) == starts  # no job started


def _kill_trial_0_mid_run(s, tmp_path, *extra: str) -> tuple[int, str]:
    """The 2-trial submitit sweep with trial 0's job SIGKILLed inside its training loop: exit code, log."""
    cmd = toy_cmd(*s.overrides(), *SUBMITIT, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                  "toy.sleep_s=2.0", *extra)  # 4 steps of 2 s: 6 s after its first report to kill trial 0 mid-run
    proc = popen(cmd, tmp_path / "sweep.log")
    try:
        deadline = time.monotonic() + 200
        while not _reported(s, 0) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _reported(s, 0), (tmp_path / "sweep.log").read_text()  # inside its training loop
        os.kill(_starts(s)[0], signal.SIGKILL)  # as scancel / a preemption: no result, no Python exit
        assert "end 0" not in s.trace_lines(), "trial 0 ended before the kill: the check proves nothing"
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "sweep.log").read_text()
    return proc.returncode, out


def test_submitit_job_killed_by_the_scheduler_is_requeued_and_its_sibling_keeps_its_result(tmp_path):
    s = make_stores(tmp_path)
    rc, out = _kill_trial_0_mid_run(s, tmp_path)
    assert rc == 0, out
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], out
    assert trials[0].user_attrs["error"].startswith(
        "its job ended without a result (killed by the scheduler?); re-queued as a new trial: UncompletedJobError")
    assert trials[2].params == trials[0].params and trials[2].system_attrs["failed_trial"] == 0
    assert "trial 0 failed: its job ended without a result (killed by the scheduler?); re-queued as a new trial" in out
    assert "trial 2/2 · best full_valid_loss" in out and "· 0 failed" in out  # the retried trial is no failure
    _, children = runs(s)
    killed = [c for c in children if c.data.tags["phitune.trial_number"] == "0"][0]
    assert killed.info.status == "KILLED" and killed.data.tags["phitune.trial_state"] == "killed"


def test_submitit_job_killed_past_max_retries_stays_failed_and_the_sweep_says_so(tmp_path):
    s = make_stores(tmp_path)
    rc, out = _kill_trial_0_mid_run(s, tmp_path, "hydra.sweeper.max_retries=0")
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], out  # no re-queued copy
    assert trials[0].user_attrs["error"].startswith(
        "its job ended without a result (killed by the scheduler?); not retried (max_retries=0)")
    assert "trial 0 failed: its job ended without a result (killed by the scheduler?); not retried (max_retries=0)" \
        in out
    # 1 of 2 failed is not above the default hydra.sweeper.max_failure_rate (0.5): the sweep ends normally.
    assert rc == 0 and "trial 2/2 · best full_valid_loss" in out and "· 1 failed" in out, out
