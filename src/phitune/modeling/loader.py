"""Model and tokenizer loading, LoRA/full training set-up, and reloading for inference.

One code path for every model: the source is a folder (`model.path`, or the tiny
Phi-3 that phitune builds) or a hub id, and from there AutoTokenizer /
AutoModelForCausalLM do the rest. So `model=phi3-mini-4k model.path=/my/copy`
exercises exactly what a hub download would.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from phitune.errors import PhituneError

BUILTINS = ("tiny-phi3",)
_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Keys of base_reference(): enough to rebuild the base model for inference.
_REF_KEYS = ("name", "builtin", "hub_id", "path", "revision", "torch_dtype", "attn_implementation",
             "trust_remote_code", "context_length")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read a field from a ModelConfig node, dataclass or plain dict alike."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def resolve_model_source(model_cfg) -> str:
    """Folder or hub id to load from: model.path > builtin > hub_id."""
    path = _get(model_cfg, "path")
    if path:
        folder = Path(os.path.expanduser(str(path)))
        if not folder.is_dir():
            raise PhituneError(f"model.path={path}: no such folder (expected a Hugging Face model folder)")
        if not (folder / "config.json").is_file():
            raise PhituneError(f"model.path={path}: no config.json there; save the model with save_pretrained()")
        return str(folder.resolve())
    builtin = _get(model_cfg, "builtin")
    if builtin:
        if builtin not in BUILTINS:
            raise PhituneError(f"model.builtin={builtin}: unknown built-in model (known: {', '.join(BUILTINS)})")
        from phitune.modeling.tiny import ensure_tiny_phi3

        return str(ensure_tiny_phi3())
    hub_id = _get(model_cfg, "hub_id")
    if hub_id:
        return str(hub_id)
    name = _get(model_cfg, "name", "?")
    raise PhituneError(f"model {name}: no source; set model.path=DIR, model.hub_id=ORG/NAME or model.builtin")


def _load_kwargs(model_cfg, source: str) -> dict:
    kwargs: dict = {"trust_remote_code": bool(_get(model_cfg, "trust_remote_code", False))}
    # A revision only means something for a hub id, not for a local folder.
    revision = _get(model_cfg, "revision")
    if revision and not Path(source).is_dir():
        kwargs["revision"] = revision
    return kwargs


def load_tokenizer(model_cfg):
    """AutoTokenizer for the model, with a pad token and a chat template guaranteed."""
    source = resolve_model_source(model_cfg)
    return _tokenizer_from(source, _load_kwargs(model_cfg, source))


def _tokenizer_from(source: str, kwargs: dict):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise PhituneError(f"cannot load the tokenizer of {source}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise PhituneError(
            f"{source}: the tokenizer has no chat template; phitune trains chat models only "
            "(use an instruct model, or add chat_template to its tokenizer_config.json)"
        )
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing
        # token works; eos is what most chat models use.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise PhituneError(f"{source}: the tokenizer has neither a pad, an eos nor an unk token")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_dtype(name: str | None, device: str = "cpu"):
    """torch dtype for a config name; "auto" = bfloat16 on a CUDA device that supports it, else float32."""
    import torch

    name = name or "auto"
    if name not in _DTYPES:
        raise PhituneError(f"model.torch_dtype={name}: expected one of {', '.join(_DTYPES)}")
    if name == "auto":
        on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_model(model_cfg, device: str = "cpu", dtype=None, auto_class=None, **model_kwargs):
    """AutoModelForCausalLM (or `auto_class`, e.g. AutoModelForSequenceClassification with
    num_labels in model_kwargs) on `device`, dtype from the config unless given, cache off (training)."""
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(model_cfg)
    torch_dtype = dtype if dtype is not None else resolve_dtype(_get(model_cfg, "torch_dtype"), device)
    kwargs = _load_kwargs(model_cfg, source)
    # transformers renamed torch_dtype -> dtype in 4.56 and warns on the old name.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs[dtype_key] = torch_dtype
    from phitune.modeling.attention import resolve

    attn = resolve(_get(model_cfg, "attn_implementation"), device)
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(source, **kwargs, **model_kwargs)
    except OSError as exc:
        raise PhituneError(f"cannot load the model {source}: {exc}") from exc
    # Training runs without a KV cache: a cache is useless there, and with one
    # transformers does not detect packed sequences (see phitune.data.pack).
    model.config.use_cache = False
    return model.to(device)


def apply_training_method(model, train_cfg, model_cfg, task_type: str = "CAUSAL_LM", modules_to_save=None):
    """Make the right parameters trainable: LoRA adapters (peft) or the whole model.

    task_type / modules_to_save: peft's, e.g. SEQ_CLS with ["score"] for a classification head
    trained whole next to the adapters."""
    method = _get(train_cfg, "method", "lora")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method != "lora":
        raise PhituneError(f"train.method={method}: expected lora or full")
    from peft import LoraConfig, TaskType, get_peft_model

    lora = _get(train_cfg, "lora")
    targets = _get(lora, "target_modules") or _get(model_cfg, "lora_target_modules")
    if not targets:
        raise PhituneError("LoRA needs target modules: set train.lora.target_modules or model.lora_target_modules")
    targets = list(targets)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if targets == ["all-linear"]:
        # peft's shorthand for every linear layer but the output head (other architectures)
        targets, missing = "all-linear", []
    if missing:
        raise PhituneError(
            f"LoRA target modules {missing} are not in {type(model).__name__} "
            f"(set train.lora.target_modules; Phi-3 uses qkv_proj, o_proj, gate_up_proj, down_proj)"
        )
    config = LoraConfig(
        r=int(_get(lora, "rank", 8)),
        lora_alpha=int(_get(lora, "alpha", 16)),
        lora_dropout=float(_get(lora, "dropout", 0.0)),
        target_modules=targets,
        bias=_get(lora, "bias", "none"),
        task_type=getattr(TaskType, task_type),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    return get_peft_model(model, config)


def base_reference(model_cfg) -> dict:
    """A JSON-able description of the base model, enough for load_for_inference() later.

    A built-in model is recorded by name (rebuilt identically on any machine), a
    folder by its absolute path, a hub model by id and revision.
    """
    ref = {key: _get(model_cfg, key) for key in _REF_KEYS}
    if ref["path"]:
        ref["path"] = str(Path(os.path.expanduser(str(ref["path"]))).resolve())
    ref["trust_remote_code"] = bool(ref["trust_remote_code"])
    return ref


def _model_cfg_from_ref(base_ref: Mapping) -> Any:
    from omegaconf import OmegaConf

    from phitune.config import ModelConfig

    known = {k: v for k, v in base_ref.items() if k in ModelConfig.__dataclass_fields__ and v is not None}
    known.setdefault("name", base_ref.get("name") or "base")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), known)


def load_for_inference(base_ref: dict, adapter_dir: str | None, device: str = "cpu"):
    """(model, tokenizer) in eval mode with the KV cache on.

    adapter_dir may hold a peft adapter (adapter_config.json: loaded on top of the
    base) or a whole fine-tuned model (config.json, from train.method=full: loaded
    instead of the base). A tokenizer saved there wins over the base's.
    """
    from peft import PeftModel

    model_cfg = _model_cfg_from_ref(base_ref)
    adapter = Path(adapter_dir) if adapter_dir else None
    if adapter is not None and not adapter.is_dir():
        raise PhituneError(f"adapter folder {adapter_dir} does not exist")
    full_model = adapter is not None and not (adapter / "adapter_config.json").is_file()
    if full_model:
        if not (adapter / "config.json").is_file():
            raise PhituneError(f"{adapter_dir}: neither a peft adapter (adapter_config.json) nor a model (config.json)")
        model_cfg.path = str(adapter)
    if model_cfg.attn_implementation == "packed_sdpa":
        model_cfg.attn_implementation = "sdpa"  # generation rows are never packed
    model = load_model(model_cfg, device=device)
    if adapter is not None and not full_model:
        model = PeftModel.from_pretrained(model, str(adapter))
        model.to(device)
    model.config.use_cache = True
    model.eval()
    if adapter is not None and (adapter / "tokenizer_config.json").is_file():
        tokenizer = _tokenizer_from(str(adapter), {"trust_remote_code": bool(model_cfg.trust_remote_code)})
    else:
        tokenizer = load_tokenizer(model_cfg)
    return model, tokenizer


def compile_layers(model, device) -> None:
    """train.compile=true: torch.compile each decoder layer in place (parameter names, hence
    checkpoints and adapters, unchanged; dynamic shapes, since packed rows vary in length).
    Eager, with a one-line note, where the compiler cannot run."""
    import shutil

    import torch

    from phitune.train.forward import note_once

    if torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        why = None if has_triton() else "Triton is not installed"
    else:
        why = None if (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")) else "no C++ compiler found"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None and why is None:
        why = f"{type(base).__name__} has no list of decoder layers"
    if why:
        note_once(f"train.compile=true: {why}; the model runs eagerly")
        return
    for layer in layers:
        layer.compile(dynamic=True)
