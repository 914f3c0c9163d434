"""Epoch checkpoints: safetensors, written atomically, the last N kept.

Layout of one checkpoint (a folder `epoch-003`):
  trainable.safetensors   every trainable parameter by name (LoRA: the adapter only)
  adapter/                deployable weights (peft adapter or full model), safetensors
  optimizer.safetensors   optimizer tensors; optimizer.json holds the rest
  rng.safetensors         torch CPU (and CUDA) generator states
  state.json              epoch, step, tokens, metric history, python/numpy RNG, run id
A checkpoint is first written to `.tmp-epoch-003` and renamed when complete, so a
run killed while saving leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^epoch-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, rest = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        rest["state"][str(idx)] = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                rest["state"][str(idx)][key] = value
    return tensors, rest


def _load_optimizer(optimizer, folder: Path) -> None:
    rest = json.loads((folder / "optimizer.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict = {int(i): dict(v) for i, v in rest["state"].items()}
    for name, tensor in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def save_checkpoint(output_dir: str | Path, epoch: int, model, optimizer, scheduler, state: dict, keep: int = 3) -> Path:
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:03d}"
    tmp = root / f".tmp-epoch-{epoch:03d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model = _unwrap(model)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
    tensors, rest = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(rest))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    np_state = np.random.get_state()
    full_state = dict(state, epoch=epoch, scheduler=scheduler.state_dict(), python_rng=_py_rng(random.getstate()),
                      numpy_rng=[np_state[0], np_state[1].tolist(), *np_state[2:]])
    (tmp / "state.json").write_text(json.dumps(full_state))
    if final.exists():  # re-saving the same epoch (resume after a crash during cleanup)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _py_rng(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def load_checkpoint(folder: str | Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, schedule and RNG; return state.json's dict."""
    folder = Path(folder)
    model = _unwrap(model)
    trainable = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in trainable if n not in params]
    if missing:
        raise ValueError(f"{folder}: checkpoint does not match the model (e.g. {missing[0]})")
    with torch.no_grad():
        for name, tensor in trainable.items():
            params[name].copy_(tensor)
    _load_optimizer(optimizer, folder)
    state = json.loads((folder / "state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state
