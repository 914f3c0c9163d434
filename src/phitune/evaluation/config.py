"""Structured config of `python eval.py` (conf/eval.yaml starts from `phitune_eval_base`).

A typo such as `eval.limt=5` fails at composition. The same `EvalSettings` are read,
with these defaults, from a training config's optional `eval` node by
`phitune.evaluation.run.evaluate_run`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from phitune.config import EvalSettings, ModelConfig, TrackingConfig  # noqa: F401 (EvalSettings re-exported)


@dataclass
class EvalDataConfig:
    test_file: str = MISSING  # chat JSONL; validated like training data first
    max_seq_len: Optional[int] = None  # tokens; None = the base model's context length
    allow_warnings: bool = True


@dataclass
class EvalAppConfig:
    # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model,
    # runs:/RUN_ID/checkpoints/epoch-002, or a local checkpoint / adapter / MLflow model folder
    model_uri: str = MISSING
    # Base model for a bare adapter folder; a run's MLflow model records its own base.
    model: ModelConfig = MISSING
    tracking: TrackingConfig = MISSING
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    seed: int = 42


def register_configs() -> None:
    ConfigStore.instance().store(name="phitune_eval_base", node=EvalAppConfig)


register_configs()
