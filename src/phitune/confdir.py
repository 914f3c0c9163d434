"""Where phitune's Hydra config groups live, for commands that read one group file
outside a Hydra run (e.g. `phitune data validate --model NAME`)."""
from __future__ import annotations

import os
from pathlib import Path

from phitune.errors import PhituneError


def conf_dir() -> Path:
    """$PHITUNE_CONF, or the repository's conf/ (src/phitune/confdir.py -> ../../conf)."""
    env = os.environ.get("PHITUNE_CONF")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "conf"


def load_model_config(name_or_path):
    """conf/model/NAME.yaml (or a path to a YAML file) as a typed phitune.config.ModelConfig node.

    Raises PhituneError with a one-line message for an unknown name or a bad file.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from phitune.config import ModelConfig

    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        path = conf_dir() / "model" / f"{text}.yaml"
        if not path.is_file():
            folder = path.parent
            names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
            known = f" (known: {', '.join(names)})" if names else ""
            raise PhituneError(f"unknown model {text!r}: no {path}{known}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    except OSError as exc:
        raise PhituneError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__  # one line
        raise PhituneError(f"{path}: not a valid model config: {detail}") from None
    return cfg
