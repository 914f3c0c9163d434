"""Stop rules a sweep checks before each trial: `hydra.sweeper.stop.target`."""
from __future__ import annotations

import pytest

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
