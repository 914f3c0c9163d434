"""The sweep grammar -> Optuna distributions, override quoting, and what counts toward n_trials."""
from __future__ import annotations

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from phitune.errors import PhituneError
from phitune.sweep.plan import plan_sweep
from phitune.sweep.space import SearchSpaceError, format_value, grid_values, parse_space, quote


@pytest.mark.parametrize("text, expected", [
    ("interval(0.1, 2.0)", FloatDistribution(0.1, 2.0)),
    ("interval(1, 5)", FloatDistribution(1.0, 5.0)),  # Hydra makes interval() bounds floats
    ("int(interval(1, 8))", IntDistribution(1, 8)),
    ("tag(log, interval(1e-4, 1))", FloatDistribution(1e-4, 1.0, log=True)),
    ("tag(log, int(interval(4, 64)))", IntDistribution(4, 64, log=True)),
    ("choice(1, 2, 4)", CategoricalDistribution([1, 2, 4])),
    ("1,2,4", CategoricalDistribution([1, 2, 4])),
    ("choice(adamw, sgd)", CategoricalDistribution(["adamw", "sgd"])),
    ("range(1, 4)", IntDistribution(1, 3)),  # Hydra's range: the stop is not a value
    ("range(1, 10, 3)", IntDistribution(1, 7, step=3)),
    ("range(5, 0, -1)", IntDistribution(1, 5)),
    ("range(0.1, 0.5, 0.1)", FloatDistribution(0.1, 0.4, step=0.1)),
    ("tag(log, range(1, 9))", IntDistribution(1, 8, log=True)),
    ("shuffle(range(1, 3))", CategoricalDistribution([1, 2])),
    ("range(3, 4)", CategoricalDistribution([3])),
])
def test_grammar_maps_to_optuna_distributions(text, expected):
    assert parse_space({"train.x": text}) == {"train.x": expected}


@pytest.mark.parametrize("text, why", [
    ("interval(2, 1)", "lower bound must be below"),
    ("tag(log, interval(0, 1))", "log scale needs a lower bound above 0"),
    ("range(3, 1)", "range is empty"),
    ("tag(log, range(1, 10, 2))", "log scale needs step 1"),
    ("tag(log, choice(1, 2))", "not to a choice"),
    ("intervl(1, 2)", "Unknown function 'intervl'"),
    ("5", "single value, not a search space"),
    ("choice([1, 2], [3])", "choice values must be"),
    ("glob(*)", "not a search space this sweeper supports"),
])
def test_bad_search_space_names_the_parameter(text, why):
    with pytest.raises(SearchSpaceError) as err:
        parse_space({"train.lora.rank": text})
    assert "'train.lora.rank'" in str(err.value) and why in str(err.value)
    assert isinstance(err.value, PhituneError)  # reaches the user as a message, not a traceback


def test_the_shipped_sweep_files_parse(repo_root):
    for path in sorted((repo_root / "sweeps").glob("*.yaml")):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package hydra.sweeper", path  # Hydra reads the package on line 1 only
        assert lines[1].startswith("# python train.py -m"), path  # then the command that uses it
        plan = plan_sweep(OmegaConf.load(path).params, [])
        assert plan.space, path
    default = plan_sweep(OmegaConf.load(repo_root / "sweeps/default.yaml").params, []).space
    assert default["train.learning_rate_multiplier"].log
    assert isinstance(default["train.batch_size_multiplier"], CategoricalDistribution)
    assert isinstance(default["train.epochs"], IntDistribution)
    lora = plan_sweep(OmegaConf.load(repo_root / "sweeps/lora.yaml").params, []).space
    assert set(lora) == {"train.lora.rank", "train.lora.alpha", "train.lora.dropout"}


def test_command_line_overrides_the_file():
    params = {"train.epochs": "range(1, 4)", "train.lora.rank": "choice(4, 8)", "train.max_steps": "5"}
    plan = plan_sweep(params, ["train.epochs=range(1,3)", "train.lora.rank=16", "sweep=lora",
                               "train.learning_rate_multiplier=tag(log, interval(0.1, 1))", "+extra=1"])
    assert plan.space["train.epochs"] == IntDistribution(1, 2)
    assert "train.lora.rank" not in plan.space  # a plain value: every trial gets it
    assert plan.space["train.learning_rate_multiplier"] == FloatDistribution(0.1, 1.0, log=True)
    assert plan.fixed == ["train.max_steps=5", "train.lora.rank=16", "sweep=lora", "+extra=1"]


def test_plus_prefixed_sweep_keeps_its_prefix_when_launched():
    plan = plan_sweep({}, ["+toy.z=choice(1,2)"])
    assert plan.space == {"toy.z": CategoricalDistribution([1, 2])}
    assert plan.launch_keys["toy.z"] == "+toy.z"


@pytest.mark.parametrize("text", [
    "sqlite:////tmp/a b/optuna.db", "it's", "a\\b", "x\\", "p$w${x}", "back\\'q", "a,b=(c)[d]{e}",
    "postgresql://user:p@ss@host:5432/db?sslmode=require&x=1",
])
def test_quoted_values_read_back_verbatim(text):
    value = OverridesParser.create().parse_override("k=" + quote(text)).value()
    assert OmegaConf.create({"k": value}).k == text  # OmegaConf resolves \${ to a literal ${


@pytest.mark.parametrize("value", [1e-05, 0.1, 3, -2, True, False, None, "adamw", 2.5e300])
def test_values_format_as_overrides_of_the_same_type(value):
    parsed = OverridesParser.create().parse_override("k=" + format_value(value)).value()
    assert parsed == value and type(parsed) is type(value)


def test_grid_values():
    assert grid_values("a", IntDistribution(1, 7, step=3)) == [1, 4, 7]
    assert grid_values("b", FloatDistribution(0.1, 0.4, step=0.1)) == [0.1, 0.2, 0.3, 0.4]
    assert grid_values("c", CategoricalDistribution(["x", "y"])) == ["x", "y"]
    with pytest.raises(SearchSpaceError, match="'d' is continuous"):
        grid_values("d", FloatDistribution(0.0, 1.0))


def test_backend_azureml_hands_the_sweep_to_azure(monkeypatch):
    import phitune.azure.sweep_job as sweep_job
    from phitune.sweep.driver import SweepContext, run_sweep

    calls = []
    monkeypatch.setattr(sweep_job, "submit_sweep", lambda config, params, sweeper_cfg, overrides=None:
                        calls.append((config, params, sweeper_cfg, overrides)) or "submitted")
    settings = OmegaConf.create({"params": {"train.epochs": "range(1, 4)", "train.max_steps": "5"}, "n_trials": 8})
    config = OmegaConf.create({"backend": {"name": "azureml"}, "train": {"epochs": 3}, "hydra": {"sweep": {"dir": "x"}}})
    ctx = SweepContext(settings=settings, config=config, launcher=None, validate=None)
    assert run_sweep(ctx, ["train.batch_size_multiplier=choice(1,2)", "seed=3"]) == "submitted"
    task_cfg, params, sweeper_cfg, overrides = calls[0]
    assert "hydra" not in task_cfg and task_cfg.backend.name == "azureml"
    assert params == {"train.epochs": "range(1, 4)", "train.batch_size_multiplier": "choice(1,2)"}
    assert sweeper_cfg.n_trials == 8 and overrides == ["train.max_steps=5", "seed=3"]
