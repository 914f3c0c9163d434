"""The backends table: what local, azureml and foundry can do, asked before anything is
created or sent."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from sweep_app.harness import REPO, make_stores, run

from phitune import backends
from phitune.errors import PhituneError

PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python"
FOUNDRY_NO_SWEEP = ("backend=foundry cannot run a sweep: Azure AI Foundry fine-tunes with fixed hyperparameters "
                    "and returns no objective to optimise; sweep with backend=azureml, "
                    "or run single jobs with backend=foundry")


def compose_cfg(overrides):
    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name, sweep, objective", [("local", "optuna", True), ("azureml", "azure", False)])
def test_backends_that_sweep(name, sweep, objective):
    b = backends.lookup(name, "sweep")
    assert (b.name, b.sweep, b.objective) == (name, sweep, objective)
    assert backends.lookup(name, "run") is b


def test_foundry_runs_but_does_not_sweep():
    assert backends.lookup("foundry", "run").name == "foundry"
    with pytest.raises(PhituneError) as err:
        backends.lookup("foundry", "sweep")
    assert str(err.value) == FOUNDRY_NO_SWEEP


@pytest.mark.parametrize("name", ["azureml", "foundry"])
def test_only_local_runs_a_trial_of_a_local_sweep(name):
    assert backends.lookup("local", "trial").objective
    with pytest.raises(PhituneError, match=f"backend={name} cannot run a trial of a local Optuna sweep"):
        backends.lookup(name, "trial")


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(PhituneError,
                       match=r"backend.name=kubernetes: no such backend; use backend=local\|azureml\|foundry"):
        backends.lookup("kubernetes")


# -- where the table is asked ---------------------------------------------------------------------

def test_run_refuses_an_unknown_backend(tmp_path, monkeypatch):
    from phitune.recipe import run as recipe_run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PhituneError, match="no such backend; use backend=local"):
        recipe_run(compose_cfg(["backend.name=kubernetes"]))


def test_a_foundry_trial_submits_nothing(tmp_path, monkeypatch):
    """A job handed a trial (as the local sweeper does) must return its objective: foundry cannot."""
    from phitune.recipe import run as recipe_run

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "azure"
    cfg = compose_cfg(["backend=foundry", "backend.dry_run=true", f"backend.output_dir={out}",
                       f"trial.storage=sqlite:///{tmp_path}/optuna.db", "trial.study_name=s", "trial.number=0"])
    with pytest.raises(PhituneError, match="backend=foundry cannot run a trial"):
        recipe_run(cfg)
    assert not out.exists()  # not even the dry run's job file


def test_foundry_sweep_is_refused_before_any_study_run_or_job(tmp_path):
    # Before: one billed Foundry fine-tuning job per trial, each result thrown away. The dry run
    # stands in for the request: its job file is what a submission would have sent.
    s = make_stores(tmp_path)
    out = tmp_path / "azure"
    cmd = [PYTHON, str(REPO / "train.py"), "-m", "backend=foundry", "backend.dry_run=true", f"backend.output_dir={out}",
           f"hydra.sweeper.storage={s.optuna_url}", f"tracking.uri={s.mlflow_url}",
           f"hydra.sweep.dir={tmp_path}/multirun",
           "hydra.sweeper.n_trials=2"]
    res = run(cmd, timeout=600, cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] == [f"error: {FOUNDRY_NO_SWEEP}"]
    assert not out.exists()  # no job built, none sent
    assert not Path(s.optuna_url[len("sqlite:///"):]).exists()  # no study
    assert not (tmp_path / "multirun").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(s.mlflow_url)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []  # no parent run
