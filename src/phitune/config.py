"""Structured configs: one dataclass per config group, stored in Hydra's ConfigStore.

conf/config.yaml starts from `phitune_base`, so a typo or a wrongly typed
override (`train.epochs=three`) fails at composition, before any compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    # Exactly one source is used: `path` (a local folder) wins over `hub_id`;
    # `builtin` names a model phitune builds itself offline (tiny-phi3).
    hub_id: Optional[str] = None
    path: Optional[str] = None
    builtin: Optional[str] = None
    revision: Optional[str] = None
    # learning rate = base_learning_rate * train.learning_rate_multiplier
    base_learning_rate: float = 2.0e-4
    # examples per optimizer step at train.batch_size_multiplier=1
    base_batch_size: int = 8
    context_length: int = 4096  # tokens; longer examples are truncated
    lora_target_modules: List[str] = field(default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    torch_dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # packed_sdpa: SDPA per packed example, no [T, T] mask (phitune.modeling.attention)
    attn_implementation: str = "packed_sdpa"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    name: str = "custom"
    train_file: str = MISSING
    validation_file: Optional[str] = None
    # file: use validation_file; auto: split `auto_fraction` of train_file (Azure's
    # "automatic split of training data"); none: no validation.
    validation: str = "file"
    auto_fraction: float = 0.1
    split_seed: int = 42
    max_seq_len: Optional[int] = None  # tokens; None = model.context_length
    test_file: Optional[str] = None  # held-out conversations for the end-of-run evaluation (else validation)
    allow_warnings: bool = True
    # Screen the data with the content filter before any compute (phitune.safety.screen).
    safety_check: bool = False
    allow_flagged: bool = False
    # a content-filter preset (default, strict: src/phitune/safety/presets/) or YAML path; None = default
    safety_config: Optional[str] = None


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[List[str]] = None  # None = model.lora_target_modules
    bias: str = "none"


@dataclass
class TrainConfig:
    method: str = "lora"  # lora | full
    learning_rate_multiplier: float = 1.0
    batch_size_multiplier: int = 1
    epochs: Any = 3  # int, or "auto" (OpenAI's heuristic from the dataset size)
    # Examples per forward pass on one device; the rest of the effective batch is
    # gradient accumulation. effective = base_batch_size * batch_size_multiplier.
    max_device_batch: int = 8
    # Memory (README "GPUs and memory"). Tokens per packed row on one device, the forward
    # pass's activation budget: a step's examples are cut into more rows (more accumulation,
    # same loss and gradient). null = max_device_batch examples whatever their length
    # (8 x 4,096 = 32,768 tokens). Must hold the longest example (data.max_seq_len).
    max_device_tokens: Optional[int] = None
    # Recompute each decoder layer in the backward instead of keeping its activations:
    # activation memory ~1 layer instead of all, ~1/3 more compute.
    gradient_checkpointing: bool = False
    # Labelled tokens per lm_head + cross-entropy chunk: the float32 [tokens, vocab] logits are
    # never whole (2,048 x 32,064 x 4 B = 263 MB a chunk). null = the plain loss on full logits.
    loss_chunk_tokens: Optional[int] = 2048
    # auto: bf16 autocast on CUDA with bf16 support (weights keep their dtype: LoRA and its
    # optimiser state float32), off elsewhere | bf16 (also on CPU) | off
    mixed_precision: str = "auto"
    compile: bool = False  # torch.compile the model (falls back to eager with a note where it cannot)
    max_steps: Optional[int] = None  # stop early (tests, smoke runs)
    eval_steps: int = 10  # valid_loss on one validation batch every N optimizer steps
    full_eval_each_epoch: bool = True
    max_grad_norm: float = 1.0
    keep_checkpoints: int = 3  # as Azure and OpenAI keep the last 3 epochs
    output_dir: Optional[str] = None  # None = checkpoints/<experiment>/<config hash>
    progress: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Single runs end with the evaluation suite (loss + generation metrics on the
    # validation or test data); sweep trials skip it.
    evaluate_at_end: bool = True


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd | adafactor
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    momentum: float = 0.0
    scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.0


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "phitune"
    run_name: Optional[str] = None
    parent_run_id: Optional[str] = None  # set by the sweeper: trials are child runs
    log_model: bool = True
    artifact_root: Optional[str] = None  # None = <folder of the sqlite db>/artifacts
    tags: dict = field(default_factory=dict)


@dataclass
class EvalSettings:
    # First N conversations of the file for everything (None = all of them).
    limit: Optional[int] = None
    # Of those, how many get a generated reply for the generation metrics (None = all).
    # Greedy decoding costs one forward pass per new token: keep this small on a CPU.
    generation_limit: Optional[int] = 16
    max_new_tokens: int = 64  # tokens per generated reply
    batch_size: int = 8  # conversations per packed forward pass of the teacher-forced loss
    device: str = "auto"  # auto | cpu | cuda | mps
    log: bool = True  # log the results to MLflow (a new run tagged phitune.eval_of=<source run>)


@dataclass
class TaskConfig:
    """`task=chat|classification` (conf/task/): what is learnt from each example."""

    name: str = "chat"  # chat: the assistant's turns; classification: one label per example
    # classification: the label set, in class-id order; null = the training file's labels, sorted
    labels: Optional[List[str]] = None
    class_weights: Optional[str] = None  # classification: null | balanced (loss weight n / (k * n_class))
    # The final metric run() returns: what a sweep optimises (hydra.sweeper.metric names it there).
    objective: str = "full_valid_loss"


@dataclass
class TrialConfig:
    """Set by phitune's Optuna sweeper: the job finds its trial through storage."""

    storage: Optional[str] = None
    study_name: Optional[str] = None
    number: Optional[int] = None


@dataclass
class PhituneConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    tracking: TrackingConfig = MISSING
    backend: Any = MISSING  # each backend's factory validates its own fields
    train: TrainConfig = field(default_factory=TrainConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)  # train.evaluate_at_end
    task: TaskConfig = field(default_factory=TaskConfig)
    seed: int = 42
    resume: bool = False


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="phitune_base", node=PhituneConfig)


register_configs()
