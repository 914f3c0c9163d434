"""End-to-end sweeps of the toy app (tests/sweep_app) as `python app.py -m` subprocesses.

The toy has the training job's side of the contract (TrialReporter, a child MLflow run
per trial) without the trainer, so each sweep takes seconds. Every test has its own
Optuna and MLflow stores under tmp_path.
"""
from __future__ import annotations

import collections
import signal
import time

import pytest
from optuna.trial import TrialState

from sweep_app.harness import load_study, make_stores, popen, run, runs, toy_cmd

pytestmark = pytest.mark.slow


def test_three_trial_sweep_leaves_one_parent_and_three_children(tmp_path):
    s = make_stores(tmp_path)
    # The file's y is choice(0, 1, 2): the command line's range wins.
    res = run(toy_cmd(*s.overrides(), "y=range(5,7)", "hydra.sweeper.plots=true"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "trial 3/3 · best full_valid_loss" in res.stdout and "· 0 pruned · 0 failed" in res.stdout

    parents, children = runs(s)
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["phitune.trial_number"] for c in children) == ["0", "1", "2"]
    assert {c.data.tags["phitune.trial_state"] for c in children} == {"complete"}
    assert {c.data.params["y"] for c in children} <= {"5", "6"}
    assert parent.info.status == "FINISHED" and parent.data.tags["phitune.study"] == "toy-sweep"
    assert parent.data.params["space.y"] == "range(5,7)" and parent.data.params["sampler"].startswith("random")
    study = load_study(s)
    assert parent.data.metrics["best_full_valid_loss"] == pytest.approx(study.best_value)
    assert parent.data.tags["phitune.best_trial"] == str(study.best_trial.number)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(s.mlflow_url)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.json", "optimization_results.yaml", "best_params.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    # 3 complete trials: no importance chart (it needs 5), the reason is logged instead.
    assert plots == {f"plots/{p}.png" for p in ("optimization_history", "intermediate_values", "parallel_coordinate",
                                                  "slice")} | {"plots/optuna_plots.html", "plots/skipped.json"}

    # The runs table: each trial's name says what it tried; the best one is marked, the parent links to it.
    best = study.best_trial
    by_number = {int(c.data.tags["phitune.trial_number"]): c for c in children}
    assert by_number[best.number].info.run_name == f"trial-{best.number} ★ best x={best.params['x']:.2g} y={best.params['y']}"
    assert [c.data.tags.get("phitune.best") for n, c in sorted(by_number.items())].count("true") == 1
    assert parent.data.tags["phitune.best_run_id"] == by_number[best.number].info.run_id
    assert all(c.info.run_name.startswith(f"trial-{n} ") for n, c in by_number.items())
    assert parent.info.run_name == f"sweep-toy-sweep · best trial-{best.number} full_valid_loss {best.value:.4g}"
    note = parent.data.tags["mlflow.note.content"]
    assert "3 trials: 3 complete, 0 pruned, 0 failed" in note and by_number[best.number].info.run_id in note

    from omegaconf import OmegaConf

    results = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    assert results.name == "optuna" and results.best_value == pytest.approx(study.best_value)
    assert set(results.best_params) == {"x", "y"}


def test_sweep_killed_mid_trial_resumes_without_repeating_trials(tmp_path):
    s = make_stores(tmp_path)
    cmd = toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=3", "toy.sleep_s=0.3", "hydra.sweeper.plots=false")
    proc = popen(cmd, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 90
        while "start 1" not in " ".join(s.trace_lines()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "start 1" in " ".join(s.trace_lines()), (tmp_path / "first.log").read_text()
        time.sleep(0.3)  # inside trial 1's training loop
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert load_study(s).get_trials()[1].state == TrialState.RUNNING  # what the dead process left

    res = run(cmd)
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert trials[1].state == TrialState.FAIL  # the killed one, found stale after its grace period
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == trials[1].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3 and len(trials) == 4

    ended = [line.split()[1] for line in s.trace_lines() if line.startswith("end ")]
    assert len(ended) == len(set(ended)) == 3  # no finished trial ran again
    parents, children = runs(s)
    assert len(parents) == 1  # the resumed sweep reused the study's parent run
    killed = [c for c in children if c.data.tags["phitune.trial_number"] == "1"]
    assert killed[0].info.status == "KILLED" and killed[0].data.tags["phitune.trial_state"] == "killed"


def test_ctrl_c_requeues_the_running_trial_for_the_next_run(tmp_path):
    s = make_stores(tmp_path)
    # 3 s trials: the interrupt lands well inside trial 1 even on a loaded machine
    cmd = toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=2", "toy.sleep_s=3", "hydra.sweeper.plots=false")
    proc = popen(cmd, tmp_path / "first.log")
    deadline = time.monotonic() + 90
    while "start 1" not in " ".join(s.trace_lines()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    log = (tmp_path / "first.log").read_text()
    assert "interrupted: the running trial(s) were recorded FAILED and queued again" in log and "Traceback" not in log
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["error"].startswith("interrupted") and trials[2].params == trials[1].params

    res = run(cmd)  # no grace period to wait for: the interrupted trial is already queued
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "waiting for" not in res.stdout
    parents, children = runs(s)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    interrupted = [c for c in children if c.data.tags["phitune.trial_number"] == "1"][0]
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["phitune.trial_state"] == "killed"


def test_pruned_trials_are_pruned_in_optuna_and_tagged_in_mlflow(tmp_path):
    s = make_stores(tmp_path)
    # A threshold of 0 prunes every trial at its first report (the toy's loss is > 0).
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.pruner.name=threshold", "hydra.sweeper.pruner.upper=0.0",
                      "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    assert all(t.last_step == 1 for t in trials)
    assert "trial 3/3 · best full_valid_loss - (no complete trial yet) · 3 pruned · 0 failed" in res.stdout
    _, children = runs(s)
    assert [c.data.tags["phitune.trial_state"] for c in children] == ["pruned"] * 3
    assert all(c.info.run_name.startswith(f"trial-{c.data.tags['phitune.trial_number']} pruned@1 x=") for c in children)
    assert not any(c.data.tags.get("phitune.best") for c in children)  # no complete trial, no best
    assert "  trial 0 pruned at step 1 (last report 1.021)" in res.stdout  # (0.646 - 0.5)^2 + 0.1 * 0 + 1/1


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=4", "toy.fail_trials=[1]", "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["error"] == "RuntimeError: simulated out of memory"
    assert "trial 1 failed: RuntimeError: simulated out of memory" in res.stdout
    assert "trial 4/4 · best full_valid_loss" in res.stdout and "· 1 failed" in res.stdout
    _, children = runs(s)
    failed = [c for c in children if c.data.tags["phitune.trial_number"] == "1"][0]
    assert failed.data.tags["phitune.trial_state"] == "failed"


def test_too_many_failures_stop_the_sweep_with_a_message(tmp_path):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=4", "toy.fail_trials=[0,1,2,3]",
                      "hydra.sweeper.max_failure_rate=0.5", "hydra.sweeper.plots=false"))
    assert res.returncode == 1
    assert "error: 1 of 1 finished trials failed, above hydra.sweeper.max_failure_rate=0.5" in res.stderr
    assert "simulated out of memory" in res.stderr and "Traceback" not in res.stderr
    assert len(load_study(s).get_trials()) == 1
    parents, _ = runs(s)
    assert parents[0].info.status == "FAILED"


def test_token_budget_stops_new_trials(tmp_path):
    s = make_stores(tmp_path)
    # The toy trains 4 steps x 100 tokens per trial: the budget is spent after 2 trials.
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=5", "hydra.sweeper.max_total_tokens=800",
                      "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "token budget spent (800 of 800 training tokens); no new trial starts" in res.stdout
    assert len(load_study(s).get_trials()) == 2


def test_two_workers_complete_one_study_without_duplicates(tmp_path):
    s = make_stores(tmp_path)
    cmd = [*toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=6", "toy.sleep_s=0.1", "hydra.sweeper.plots=false")]
    workers = [popen([*cmd[:-1], cmd[-1], f"hydra.sweep.dir={tmp_path}/w{i}"], tmp_path / f"w{i}.log") for i in range(2)]
    for w in workers:
        assert w.wait(timeout=150) == 0, "\n".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    trials = load_study(s).get_trials()
    counted = [t for t in trials if not t.user_attrs.get("phitune.discarded")]
    assert len(counted) == 6 and all(t.state == TrialState.COMPLETE for t in counted)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    started = collections.Counter(line.split()[1] for line in s.trace_lines() if line.startswith("start "))
    assert sorted(started) == sorted(str(t.number) for t in counted) and set(started.values()) == {1}
    assert len({line.split()[2] for line in s.trace_lines() if line.startswith("start ")}) == 2  # both worked
    assert len({(t.params["x"], t.params["y"]) for t in counted}) == 6
    parents, children = runs(s)
    assert len(parents) == 1 and len(children) == 6  # one parent shared by both workers


def test_joblib_launcher_runs_trials_in_worker_processes(tmp_path):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",  # sweeper: batches of 2
                      "hydra.sweeper.n_trials=4", "hydra.sweeper.pruner.name=threshold",
                      "hydra.sweeper.pruner.upper=100", "toy.fail_trials=[3]", "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL]
    assert all(t.user_attrs["train_tokens"] == 400 for t in trials[:3])  # reported from the workers
    pids = {line.split()[2] for line in s.trace_lines() if line.startswith("start ")}
    assert len(pids) == 2  # two loky workers, not the sweeper's process


def test_bad_search_space_is_a_message_not_a_traceback(tmp_path):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.params.x='interval(2, 1)'"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "error: search space for 'x': interval(2, 1): the lower bound must be below the upper bound" in res.stderr
    res = run(toy_cmd(*s.overrides(), "toy.stpes=range(1,3)"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "error: the sweep's overrides do not fit the config" in res.stderr and "stpes" in res.stderr


def test_grid_sampler_covers_the_grid_once(tmp_path):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.sampler.name=grid", "x=range(0.0,1.0,0.5)", "y=choice(0,1)",
                      "hydra.sweeper.n_trials=10", "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the grid has 4 points; n_trials 10 -> 4" in res.stdout
    trials = load_study(s).get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted((t.params["x"], t.params["y"]) for t in trials) == [(x, y) for x in (0.0, 0.5) for y in (0, 1)]
