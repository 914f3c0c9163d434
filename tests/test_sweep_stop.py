"""Stop rules a sweep checks before each trial: `hydra.sweeper.stop.target`."""
from __future__ import annotations

import pytest
from optuna.trial import TrialState

from sweep_app.harness import load_study, make_stores, run, runs, toy_cmd

pytestmark = pytest.mark.slow


def test_stop_target_stops_starting_trials_once_the_objective_reaches_it(tmp_path):
    s = make_stores(tmp_path)
    # The toy's first trial (random sampler, seed 0) scores 0.2714: any target above it is reached at once.
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=5", "hydra.sweeper.stop.target=0.5",
                      "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("sweep: target reached (best full_valid_loss 0.2714 of trial 0 <= hydra.sweeper.stop.target=0.5); "
            "no new trial starts") in res.stdout
    assert len(load_study(s).get_trials()) == 1
    parents, _ = runs(s)
    assert parents[0].data.tags["phitune.stop_reason"].startswith("target reached")


def test_stop_target_not_reached_runs_every_trial(tmp_path):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=3", "hydra.sweeper.stop.target=0.01",
                      "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "target reached" not in res.stdout and len(load_study(s).get_trials()) == 3


def test_stop_target_on_several_objectives_is_refused_before_any_trial(tmp_path):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.stop.target=0.5", "hydra.sweeper.direction=[minimize,minimize]"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "error: hydra.sweeper.stop.target=0.5: a sweep of 2 objectives has no single best value" in res.stderr


# -- stop.max_cost: wall hours x 1 GPU x price_per_gpu_hour -----------------------------------
# At 3600 USD per GPU-hour a trial costs 1 USD per second of its wall time. toy.sleep_s gives
# each trial a floor on its time (never a ceiling: the machine may be slow), so a max_cost below
# two floors lets exactly one trial start, however long the trials really take.

def _cost_stops_after_one_trial(s, *extra):
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=5", "hydra.sweeper.stop.price_per_gpu_hour=3600",
                      "hydra.sweeper.stop.max_cost=1.5", "hydra.sweeper.plots=false", *extra))
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert len(trials) == 1, res.stdout
    assert "sweep: cost so far 0.00 USD, next trial ~? (none finished yet), max_cost 1.50: starting trial 0" in res.stdout
    stop = [line for line in res.stdout.splitlines() if line.startswith("sweep: cost so far") and "stopping" in line]
    assert len(stop) == 1 and stop[0].endswith(": stopping: the next trial would pass max_cost; no new trial starts")
    spent = trials[0].duration.total_seconds()  # USD, at 1 USD per second
    assert spent >= 1.0 and f"cost so far {spent:.2f} USD, next trial ~{spent:.2f} USD, max_cost 1.50" in stop[0]
    parents, _ = runs(s)
    parent = parents[0]
    assert parent.data.metrics["cost_total"] == pytest.approx(spent, rel=1e-6)
    assert parent.data.tags["phitune.cost"].startswith(f"{spent:.2f} USD: ")
    assert parent.data.tags["phitune.cost"].endswith(" GPU-hours x 3600 USD per GPU-hour")
    assert parent.data.tags["phitune.stop_reason"].startswith("cost so far ")
    assert parent.data.params["stop.price_per_gpu_hour"] == "3600 USD"
    return trials[0]


def test_max_cost_stops_before_a_trial_whose_estimate_would_pass_it(tmp_path):
    s = make_stores(tmp_path)
    trial = _cost_stops_after_one_trial(s, "toy.sleep_s=0.25")  # 4 steps x 0.25 s: >= 1 USD a trial
    assert trial.state == TrialState.COMPLETE


def test_max_cost_counts_a_pruned_trial_s_cost(tmp_path):
    s = make_stores(tmp_path)
    # Pruned at its first report, after 1 s of sleep: it still cost >= 1 USD, and is the estimate.
    trial = _cost_stops_after_one_trial(s, "toy.sleep_s=1.0", "hydra.sweeper.pruner.name=threshold",
                                        "hydra.sweeper.pruner.upper=0.0")
    assert trial.state == TrialState.PRUNED and trial.last_step == 1


def test_max_cost_within_budget_runs_every_trial_and_records_the_cost(tmp_path):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), "hydra.sweeper.n_trials=3", "hydra.sweeper.stop.price_per_gpu_hour=2.5",
                      "hydra.sweeper.stop.max_cost=1000", "hydra.sweeper.stop.currency=EUR",
                      "hydra.sweeper.plots=false"))
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load_study(s).get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    starts = [line for line in res.stdout.splitlines() if ": starting trial " in line]
    assert [line.rsplit(" ", 1)[-1] for line in starts] == ["0", "1", "2"]
    assert all("max_cost 1000.00: starting" in line for line in starts) and " EUR, next trial ~" in starts[1]
    parents, _ = runs(s)
    seconds = sum(t.duration.total_seconds() for t in trials)
    assert parents[0].data.metrics["cost_total"] == pytest.approx(seconds / 3600 * 2.5, rel=1e-6)
    assert "phitune.stop_reason" not in parents[0].data.tags


@pytest.mark.parametrize("overrides, message", [
    (["hydra.sweeper.stop.max_cost=0.5"],
     "error: hydra.sweeper.stop.max_cost=0.5 needs a price to count the cost: set hydra.sweeper.stop.price_per_gpu_hour"),
    (["hydra.sweeper.stop.max_cost=0.5", "hydra.sweeper.stop.price_per_gpu_hour=-1"],
     "error: hydra.sweeper.stop.price_per_gpu_hour=-1.0: expected 0 or more"),
    (["hydra.sweeper.stop.max_cost=0", "hydra.sweeper.stop.price_per_gpu_hour=2"],
     "error: hydra.sweeper.stop.max_cost=0.0: expected more than 0"),
    (["hydra.sweeper.stop.max_cost=5", "backend.name=azureml"],
     "error: hydra.sweeper.stop.max_cost=5.0 is for local sweeps: backend=azureml estimates a sweep's cost before "
     "submitting it; set backend.max_cost and backend.price_per_node_hour"),
])
def test_bad_cost_settings_are_refused_before_any_trial(tmp_path, overrides, message):
    s = make_stores(tmp_path)
    res = run(toy_cmd(*s.overrides(), *overrides))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert message in res.stderr
    assert not (tmp_path / "optuna.db").exists() or not load_study_names(s)


def load_study_names(s):
    import optuna

    return optuna.get_all_study_names(s.optuna_url)
