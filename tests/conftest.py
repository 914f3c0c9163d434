"""Shared fixtures: the tiny Phi-3 built once per session in a throw-away cache.

Session-scoped fixtures are shared by every test: read them, don't mutate them
(derive a changed config with OmegaConf.merge(tiny_model_cfg, {...})).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# conf/data/*.yaml resolve data files through ${oc.env:PHITUNE_ROOT,.}.
os.environ.setdefault("PHITUNE_ROOT", str(REPO_ROOT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def phitune_cache(tmp_path_factory) -> Path:
    """PHITUNE_CACHE -> a fresh folder for the whole session (as on a clean CI machine).

    Autouse so that any code path reaching ensure_tiny_phi3() (config composition,
    subprocesses, which inherit os.environ) never reads or writes ~/.cache.
    """
    cache = tmp_path_factory.mktemp("phitune-cache")
    old = os.environ.get("PHITUNE_CACHE")
    os.environ["PHITUNE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("PHITUNE_CACHE", None)
    else:
        os.environ["PHITUNE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(phitune_cache) -> Path:
    """Folder of the tiny Phi-3 (config.json, model.safetensors, tokenizer files)."""
    from phitune.modeling.tiny import ensure_tiny_phi3

    return ensure_tiny_phi3()


@pytest.fixture(scope="session")
def tiny_model_cfg(repo_root, tiny_model_dir):
    """conf/model/tiny-phi3.yaml as a ModelConfig node (shared: don't mutate)."""
    from omegaconf import OmegaConf

    from phitune.config import ModelConfig

    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(repo_root / "conf/model/tiny-phi3.yaml"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_cfg):
    from phitune.modeling.loader import load_tokenizer

    return load_tokenizer(tiny_model_cfg)


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch

    torch.manual_seed(0)
