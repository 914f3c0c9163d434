"""phitune's sweeper under Hydra apps that know nothing of phitune (tests/sweep_app/foreign.py):
the Hydra Optuna sweeper's own example scenarios with only `override hydra/sweeper:
phitune_optuna`, then what that sweeper lacks (pruning through `report`, resume, MLflow
children). Each app is written into tmp_path and run as `python APP.py -m` there.
"""
from __future__ import annotations

import math
import signal
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from sweep_app import foreign
from sweep_app.harness import make_stores, popen, run

pytestmark = pytest.mark.slow


def _app(tmp_path, name, source, conf, extra=None):
    make_stores(tmp_path)  # tmp_path/mlruns/mlflow.db: phitune's default tracking store, relative to the cwd
    return foreign.write_app(tmp_path, name, source, {"conf/config.yaml": conf, **(extra or {})})


def _sweep(script, *overrides, timeout=300):
    return run([sys.executable, str(script), "-m", *overrides], timeout=timeout, cwd=script.parent)


def _storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/test.db"


def _runs(tmp_path, experiment: str):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("phitune.role") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) + len(children) == len(runs), "a run that is neither the sweep nor a trial"
    return client, parents, children


@pytest.mark.parametrize("with_commandline", [True, False])
def test_quadratic_with_tpe_seed_123_finds_a_low_value(tmp_path, with_commandline):
    script = _app(tmp_path, "quadratic", foreign.QUADRATIC, foreign.QUADRATIC_CONF)
    storage = _storage(tmp_path)
    overrides = [f"hydra.sweep.dir={tmp_path}/multirun", "hydra.job.chdir=True", "hydra.sweeper.n_trials=20",
                 "hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=q",
                 "hydra/sweeper/sampler=tpe", "hydra.sweeper.sampler.seed=123", "~z"]
    if with_commandline:
        overrides += ["x=choice(0, 1, 2)", "y=0"]  # y fixed: not searched
    res = _sweep(script, *overrides)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    study = optuna.load_study(study_name="q", storage=storage)
    best = study.best_trial
    assert results.name == "optuna" and results.best_value == best.value
    assert results.best_params["x"] == best.params["x"]
    assert len(study.trials) == 20 and all(t.state == TrialState.COMPLETE for t in study.trials)
    if with_commandline:
        assert "y" not in results.best_params and "y" not in best.params
    else:
        assert results.best_params["y"] == best.params["y"]
    # The Hydra Optuna sweeper's own bound: TPE's 95th percentile over 1000 seeds on this problem.
    assert results.best_value <= 2.27
    assert "Traceback" not in res.stderr

    # No MLflow in the app: each trial still has a child run with its params and objective.
    _, parents, children = _runs(tmp_path, "quadratic")
    assert len(parents) == 1 and len(children) == 20
    for child in children:
        trial = study.trials[int(child.data.tags["phitune.trial_number"])]
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert float(child.data.params["x"]) == trial.params["x"]
        assert child.data.metrics["objective"] == pytest.approx(trial.value)
        assert child.info.status == "FINISHED" and child.data.tags["phitune.trial_state"] == "complete"
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id


@pytest.mark.parametrize("n_trials", [10, 1])
def test_grid_sampler(tmp_path, n_trials):
    script = _app(tmp_path, "quadratic", foreign.QUADRATIC, foreign.QUADRATIC_CONF,
                  {"conf/grid.yaml": foreign.GRID_CONF})
    storage = _storage(tmp_path)
    res = _sweep(script, "--config-name=grid", f"hydra.sweep.dir={tmp_path}/multirun", "hydra.job.chdir=False",
                 f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage={storage}",
                 "hydra.sweeper.study_name=grid", "hydra.sweeper.plots=false")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    trials = optuna.load_study(study_name="grid", storage=storage).trials
    # range(-1.0, 1.0, step=1) is -1.0 and 0.0 (Hydra's range: the stop is excluded): 2 x 2 x 2 points.
    points = {(t.params["x"], t.params["y"], t.params["z"]) for t in trials}
    assert len(trials) == len(points) == min(n_trials, 8)
    if n_trials >= 8:
        assert "the grid has 8 points; n_trials 10 -> 8" in res.stdout
        assert points == {(x, y, z) for x in (-1, 1) for y in (-1.0, 0.0) for z in ("foo", "bar")}
        assert results.best_value == 1 and abs(results.best_params["x"]) == 1 and results.best_params["y"] == 0
    assert results.best_params["z"] in ("foo", "bar")


def _dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


@pytest.mark.parametrize("with_commandline", [True, False])
def test_two_objectives_leave_a_pareto_front(tmp_path, with_commandline):
    script = _app(tmp_path, "two_goals", foreign.TWO_GOALS, foreign.TWO_GOALS_CONF)
    storage = _storage(tmp_path)
    overrides = [f"hydra.sweep.dir={tmp_path}/multirun", "hydra.job.chdir=True", "hydra.sweeper.n_trials=20",
                 "hydra.sweeper.n_jobs=1", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123",
                 f"hydra.sweeper.storage={storage}"]
    if with_commandline:
        overrides += ["x=range(0, 5)", "y=range(0, 3)"]
    res = _sweep(script, *overrides)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    assert results.name == "optuna" and "best_value" not in results
    study = optuna.load_study(study_name="two-goals", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 20
    front = [OmegaConf.to_container(s) for s in results.solutions]
    assert front and sorted(s["number"] for s in front) == sorted(t.number for t in study.best_trials)
    steps = {0} if with_commandline else {0, 0.5}
    for s in front:
        assert s["params"]["x"] % 1 in steps and s["params"]["y"] % 1 in steps
        x, y = s["params"]["x"], s["params"]["y"]
        assert s["values"] == pytest.approx([4 * x ** 2 + 4 * y ** 2, (x - 5) ** 2 + (y - 5) ** 2])
        assert not any(_dominates(t["values"], s["values"]) for t in front)
        # ... nor by any trial of the study: the front is the whole study's.
        assert not any(_dominates(t.values, s["values"]) for t in complete)
    assert f"{len(front)} Pareto solution" in res.stdout
    _, _, children = _runs(tmp_path, "two_goals")
    assert {tuple(sorted(c.data.metrics)) for c in children} == {("objective_0", "objective_1")}


def test_custom_search_space_adds_constrained_and_new_params(tmp_path):
    script = _app(tmp_path, "constrained", foreign.CONSTRAINED, foreign.CONSTRAINED_CONF)
    storage = _storage(tmp_path)
    res = _sweep(script, f"hydra.sweep.dir={tmp_path}/multirun", "hydra.job.chdir=True", "hydra.sweeper.n_trials=20",
                 "hydra.sweeper.n_jobs=1", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123",
                 f"hydra.sweeper.storage={storage}", "hydra.sweeper.plots=false", "max_gap=0.3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    assert results.name == "optuna"
    assert abs(results.best_params["x"] - results.best_params["z"]) <= 0.3
    assert 0 <= results.best_params["+w"] <= 1
    trials = optuna.load_study(study_name="constrained", storage=storage).trials
    assert len(trials) == 20 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:  # the job got z and w: its objective has them
        p = t.params
        assert abs(p["x"] - p["z"]) <= 0.3
        assert t.value == pytest.approx(p["+w"] ** 2 + p["x"] ** 2 + p["y"] ** 2 + p["z"] ** 2)


@pytest.mark.parametrize("max_failure_rate", [0.5, 1.0])
def test_failing_app_and_max_failure_rate(tmp_path, max_failure_rate):
    script = _app(tmp_path, "quadratic", foreign.QUADRATIC, foreign.QUADRATIC_CONF)
    storage = _storage(tmp_path)
    res = _sweep(script, f"hydra.sweep.dir={tmp_path}/multirun", "hydra.job.chdir=True", "hydra.sweeper.n_trials=20",
                 "hydra.sweeper.n_jobs=2", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123",
                 f"hydra.sweeper.max_failure_rate={max_failure_rate}", f"hydra.sweeper.storage={storage}",
                 "hydra.sweeper.plots=false", "crash=true")
    trials = optuna.load_study(study_name="quadratic", storage=storage).trials
    assert all(t.state == TrialState.FAIL and t.user_attrs["error"] == "RuntimeError: asked to crash" for t in trials)
    assert "trial 0 failed: RuntimeError: asked to crash" in res.stdout
    assert "Traceback" not in res.stderr
    if max_failure_rate < 1.0:
        # The first batch (2 jobs) fails: 2 of 2 is above 0.5; one error line names the error.
        assert res.returncode == 1 and len(trials) == 2
        assert "error: 2 of 2 finished trials failed, above hydra.sweeper.max_failure_rate=0.5" in res.stderr
        assert "RuntimeError: asked to crash" in res.stderr
    else:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert len(trials) == 20 and "RuntimeError: asked to crash" not in res.stderr
        assert "trial 20/20 · best objective - (no complete trial yet) · 0 pruned · 20 failed" in res.stdout
        _, _, children = _runs(tmp_path, "quadratic")
        assert {c.info.status for c in children} == {"FAILED"} and len(children) == 20


def test_pruning_through_report_under_the_basic_and_joblib_launchers(tmp_path):
    script = _app(tmp_path, "curve", foreign.CURVE, foreign.CURVE_CONF)
    trace = tmp_path / "trace.txt"
    for launcher, flag in (["hydra/launcher=basic"], "false"), (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], "true"):
        study = f"curve-{flag}"
        trace.unlink(missing_ok=True)
        res = _sweep(script, *launcher, f"hydra.sweep.dir={tmp_path}/{study}", f"hydra.sweeper.study_name={study}",
                     f"hydra.sweeper.storage={_storage(tmp_path)}", "hydra.sweeper.plots=false", f"flag={flag}",
                     f"trace={trace}")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        trials = optuna.load_study(study_name=study, storage=_storage(tmp_path)).trials
        steps_run = {}
        for line in trace.read_text().splitlines():
            x, step = line.split()
            steps_run[float(x)] = max(steps_run.get(float(x), 0), int(step))
        assert len(trials) == 6
        for t in trials:
            x = t.params["x"]
            if (x - 0.3) ** 2 + 1 > 1.2:  # above the threshold at the first report
                assert t.state == TrialState.PRUNED and t.last_step == 1 and steps_run[x] == 1, (launcher, t)
            else:
                assert t.state == TrialState.COMPLETE and steps_run[x] == 4 and t.last_step == 4
                assert t.value == pytest.approx((x - 0.3) ** 2 + 0.25)
        assert {TrialState.PRUNED, TrialState.COMPLETE} == {t.state for t in trials}, "both outcomes, or nothing is shown"
        assert "pruned at step 1" in res.stdout
    _, _, children = _runs(tmp_path, "curve")
    assert "pruned" in {c.data.tags["phitune.trial_state"] for c in children}


def test_report_outside_a_sweep_does_nothing(tmp_path):
    script = _app(tmp_path, "curve", foreign.CURVE, foreign.CURVE_CONF)
    res = run([sys.executable, str(script), "x=2.0"], cwd=tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


def test_storage_null_keeps_the_study_in_a_file_and_ctrl_c_then_rerun_resumes(tmp_path):
    script = _app(tmp_path, "curve", foreign.CURVE, foreign.CURVE_CONF)
    trace = tmp_path / "trace.txt"
    cmd = [sys.executable, str(script), "-m", f"hydra.sweep.dir={tmp_path}/multirun",
           "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner.name=none", "hydra.sweeper.plots=false",
           "sleep_s=0.3", f"trace={trace}"]
    proc = popen(cmd, tmp_path / "first.log", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while len(trace.read_text().splitlines() if trace.exists() else []) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)  # inside trial 1 (4 steps per trial)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    log = (tmp_path / "first.log").read_text()
    assert log.count("note: hydra.sweeper.storage is null: study 'curve' is kept in "
                     f"sqlite:///{tmp_path}/mlruns/optuna.db, so re-running this command resumes it") == 1, log
    assert "Traceback" not in log
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    trials = optuna.load_study(study_name="curve", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    done_before = {trials[0].params["x"]}

    res = run(cmd, cwd=tmp_path)  # the same command: the interrupted trial first, then the rest
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trials = optuna.load_study(study_name="curve", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].params == trials[1].params  # re-run with the same params
    firsts = [float(line.split()[0]) for line in trace.read_text().splitlines() if line.endswith(" 1")]
    assert firsts.count(next(iter(done_before))) == 1  # the finished trial never ran again
    _, parents, children = _runs(tmp_path, "curve")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    killed = [c for c in children if c.data.tags["phitune.trial_number"] == "1"]
    assert killed[0].info.status == "KILLED" and killed[0].data.tags["phitune.trial_state"] == "killed"


@pytest.mark.parametrize("own_run, launcher", [(True, ["hydra/launcher=basic"]), (False, ["hydra/launcher=basic"]),
                                               (False, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])])
def test_an_apps_own_mlflow_calls_land_in_its_trials_child_run(tmp_path, own_run, launcher):
    script = _app(tmp_path, "logged", foreign.LOGGED, foreign.LOGGED_CONF)
    storage = _storage(tmp_path)
    res = _sweep(script, *launcher, f"hydra.sweep.dir={tmp_path}/multirun", f"hydra.sweeper.storage={storage}",
                 f"hydra.sweeper.tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
                 "hydra.sweeper.tracking.experiment=logged", f"own_run={str(own_run).lower()}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trials = optuna.load_study(study_name="logged", storage=storage).trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    client, parents, children = _runs(tmp_path, "logged")
    assert len(parents) == 1 and len(children) == 4  # no stray run: every call landed in a trial's run
    for child in children:
        trial = trials[int(child.data.tags["phitune.trial_number"])]
        x = trial.params["x"]
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert child.data.params["x"] == str(x)
        history = client.get_metric_history(child.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(s, x * 10 + s) for s in range(3)]
        assert child.data.metrics["objective"] == x * 10
        assert child.info.status == "FINISHED" and child.data.tags["phitune.trial_state"] == "complete"


def test_lightning_hydra_template_hparams_search_shape(tmp_path):
    make_stores(tmp_path)
    script = foreign.write_app(tmp_path, "train", foreign.TEMPLATE_TRAIN, foreign.TEMPLATE_FILES)
    # As the template runs it: hydra.mode=MULTIRUN comes from the hparams_search file, no -m.
    res = run([sys.executable, str(script), "hparams_search=tiny_optuna", "hydra.sweeper.n_trials=12",
               f"hydra.sweep.dir={tmp_path}/multirun", "hydra.sweeper.plots=false"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "note: hydra.sweeper.storage is null" in res.stderr
    study = optuna.load_study(study_name="train", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert len(study.trials) == 12 and study.direction == optuna.study.StudyDirection.MAXIMIZE
    values = [t.value for t in study.trials]
    results = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    assert results.best_value == max(values) and math.isfinite(results.best_value)
    assert set(results.best_params) == {"model.optimizer.lr", "data.batch_size", "model.net.lin1_size",
                                        "model.net.lin2_size", "model.net.lin3_size"}
    assert "sampler tpe(seed=1234, n_startup_trials=10)" in res.stdout
