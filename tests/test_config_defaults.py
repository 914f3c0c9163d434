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
    top.pop("hydra", None)  # the help text
    for key, value in _leaves(top):
        assert value == _default(PhituneConfig, key), f"conf/config.yaml {key}: {value!r} differs from src/phitune/config.py"


def test_model_defaults_are_what_every_shipped_model_uses():
    for path in sorted((REPO / "conf/model").glob("*.yaml")):
        attn = yaml.safe_load(path.read_text())["attn_implementation"]
        assert attn == ModelConfig.attn_implementation, path


def test_sweeper_seed_default_is_the_shipped_one():
    shipped = yaml.safe_load((REPO / "sweeps/default.yaml").read_text())
    assert shipped["sampler"]["seed"] == _default(PhituneOptunaSweeperConf, "sampler.seed")


def test_train_help_is_phitunes_own():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "powered by Hydra" not in text and "python train.py -m" in text
    for path in sorted((REPO / "sweeps").glob("*.yaml")):  # every sweep file is named
        assert f"sweeps/{path.name}" in text, path.name
    for group in sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir()):
        options = ", ".join(sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")))
        assert f"{group}: {options}" in text, group
    for name in ("train.learning_rate_multiplier", "train.batch_size_multiplier", "train.epochs"):
        assert name in text
