"""hydra.sweeper.* as Hydra composes it: the `hydra/sweeper/sampler` group of the Hydra Optuna
sweeper and phitune's `sampler.name` spelling, directions, objectives. In one process, no sweep."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir

from phitune.errors import PhituneError
from phitune.sweep import study as st
from phitune.sweep.driver import objective_values, parse_directions

REPO = Path(__file__).resolve().parents[1]
SPACE = {"x": optuna.distributions.IntDistribution(1, 3)}


def _sweeper(conf_dir: Path, *overrides: str):
    import phitune.config  # noqa: F401  (registers phitune_base, which conf/config.yaml starts from)

    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra.sweeper


@pytest.mark.parametrize("option, cls", [("tpe", "TPESampler"), ("random", "RandomSampler"), ("grid", "GridSampler"),
                                         ("qmc", "QMCSampler"), ("nsgaii", "NSGAIISampler"),
                                         ("nsgaiii", "NSGAIIISampler"), ("gp", "GPSampler")])
def test_each_sampler_option_builds_its_optuna_sampler_with_its_seed(tmp_path, option, cls):
    (tmp_path / "config.yaml").write_text("defaults:\n  - override hydra/sweeper: phitune_optuna\n  - _self_\n")
    s = _sweeper(tmp_path, f"hydra/sweeper/sampler={option}", "hydra.sweeper.sampler.seed=7")
    assert s.sampler._target_ == f"optuna.samplers.{cls}"
    sampler = st.make_sampler(s.sampler, SPACE)
    assert type(sampler).__name__ == cls
    assert st.describe_sampler(s.sampler).startswith(f"{option}(seed=7")


def test_an_optuna_argument_reaches_the_sampler_and_a_typo_fails_at_composition(tmp_path):
    (tmp_path / "config.yaml").write_text("defaults:\n  - override hydra/sweeper: phitune_optuna\n  - _self_\n")
    s = _sweeper(tmp_path, "hydra/sweeper/sampler=nsgaii", "hydra.sweeper.sampler.population_size=4")
    assert st.make_sampler(s.sampler, SPACE)._population_size == 4
    with pytest.raises(Exception, match="populaton_size"):
        _sweeper(tmp_path, "hydra/sweeper/sampler=nsgaii", "hydra.sweeper.sampler.populaton_size=4")


def test_train_py_sweeps_still_build_the_same_tpe():
    # sweeps/default.yaml names its sampler (`name: tpe`) over the group's default TPE node.
    s = _sweeper(REPO / "conf")
    sampler = st.make_sampler(s.sampler, SPACE)
    assert st.describe_sampler(s.sampler) == "tpe(seed=42, n_startup_trials=5)"
    assert (sampler._n_startup_trials, sampler._multivariate, sampler._constant_liar) == (5, False, False)
    assert isinstance(st.make_sampler(_sweeper(REPO / "conf", "hydra.sweeper.sampler.name=random").sampler, SPACE),
                      optuna.samplers.RandomSampler)


def test_the_target_spelling_on_the_default_node(tmp_path):
    (tmp_path / "config.yaml").write_text("defaults:\n  - override hydra/sweeper: phitune_optuna\n  - _self_\n")
    s = _sweeper(tmp_path, "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler")
    # TPE's fields stay on the node but are not RandomSampler's arguments: left out.
    assert st.describe_sampler(s.sampler) == "random(seed=42)"
    assert isinstance(st.make_sampler(s.sampler, SPACE), optuna.samplers.RandomSampler)
    with pytest.raises(PhituneError, match="expected one of Optuna's samplers"):
        st.sampler_choice(_sweeper(tmp_path, "hydra.sweeper.sampler._target_=my.Sampler").sampler)


def test_a_name_that_contradicts_the_chosen_option_is_refused():
    s = _sweeper(REPO / "conf", "hydra/sweeper/sampler=gp")  # sweeps/default.yaml says name: tpe
    with pytest.raises(PhituneError, match=r"name=tpe and _target_=optuna.samplers.GPSampler are two different "
                                           r"samplers; keep one \(hydra/sweeper/sampler=tpe, or "
                                           r"hydra.sweeper.sampler.name=gp\)"):
        st.make_sampler(s.sampler, SPACE)
    s = _sweeper(REPO / "conf", "hydra/sweeper/sampler=gp", "hydra.sweeper.sampler.name=gp")
    assert isinstance(st.make_sampler(s.sampler, SPACE), optuna.samplers.GPSampler)


def test_directions():
    assert parse_directions("maximize") == ["maximize"]
    assert parse_directions(["minimize", "MAXIMIZE"]) == ["minimize", "maximize"]
    with pytest.raises(PhituneError, match=r"hydra.sweeper.direction=\['minimize', 'up'\]: expected minimize or "
                                           "maximize, or a list of them"):
        parse_directions(["minimize", "up"])


def test_objective_values():
    assert objective_values(1, 1) == ([1.0], None)
    assert objective_values((1, 2.5), 2) == ([1.0, 2.5], None)
    assert objective_values(None, 1) == (None, "the job returned None, not a number")
    assert objective_values(3.0, 2)[1] == "the job returned 3.0, not a sequence of 2 numbers (hydra.sweeper.direction has 2)"
    assert objective_values([1.0], 2) == (None, "the job returned 1 values; hydra.sweeper.direction has 2")
    assert objective_values(float("nan"), 1) == (None, "the objective is nan (training diverged?)")
