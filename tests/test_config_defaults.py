"""Defaults live in one place: the shipped YAML restates no dataclass default differently."""
from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf

from phitune.config import ModelConfig, PhituneConfig
from phitune.sweep.settings import PhituneOptunaSweeperConf

REPO = Path(__file__).resolve().parents[1]


def _leaves(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _default(schema, dotted: str):
    return OmegaConf.select(OmegaConf.structured(schema), dotted, throw_on_missing=False)


def test_config_yaml_restates_no_default_differently():
    top = yaml.safe_load((REPO / "conf/config.yaml").read_text()) or {}
    top.pop("defaults", None)
    for key, value in _leaves(top):
        assert value == _default(PhituneConfig, key), f"conf/config.yaml {key}: {value!r} differs from src/phitune/config.py"


def test_model_defaults_are_what_every_shipped_model_uses():
    for path in sorted((REPO / "conf/model").glob("*.yaml")):
        attn = yaml.safe_load(path.read_text())["attn_implementation"]
        assert attn == ModelConfig.attn_implementation, path


def test_sweeper_seed_default_is_the_shipped_one():
    shipped = yaml.safe_load((REPO / "sweeps/default.yaml").read_text())
    assert shipped["sampler"]["seed"] == _default(PhituneOptunaSweeperConf, "sampler.seed")
