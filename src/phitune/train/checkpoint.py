"""Epoch checkpoints: safetensors, written atomically, the last N kept.

Layout of an output folder (`checkpoints/<experiment>/<config hash>/`):
  run.json                the MLflow run this folder belongs to, written when the run starts,
                          so that resume=true continues that run even before any checkpoint
  epoch-003/              one complete checkpoint per kept epoch:
    trainable.safetensors   every trainable parameter by name (LoRA: the adapter only)
    adapter/                deployable weights (peft adapter or full model), safetensors
    optimizer.safetensors   optimizer tensors; optimizer.json holds the rest
    rng-rank0.safetensors   torch CPU (and CUDA) generator states of rank 0, python and numpy
                            RNG in its metadata; one file per DDP rank (rng-rank1, ...)
    state.json              epoch, step, tokens, metric history, run id
A checkpoint is saved in three steps: `write_checkpoint` fills `.tmp-epoch-003-<pid>`;
the loop's callbacks log that folder (metrics, adapter) to MLflow; `publish_checkpoint`
renames it to `epoch-003`. A run killed before the rename leaves the previous
checkpoint as the latest complete one, and a resumed run redoes the epoch and logs it
again; a checkpoint that is visible is therefore always in MLflow too. This order was
chosen over re-logging missing epochs on resume: nothing has to find out later what MLflow
lacks, and the replayed epoch's points already logged are skipped (tracking.run). The
next start in the folder removes the partial `.tmp-*` folders (one run per output
folder at a time).
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^epoch-(\d+)$")
_PARTIAL = ".tmp-epoch-"  # + NNN-<pid>: a checkpoint being written
RUN_FILE = "run.json"


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


def write_checkpoint(output_dir: str | Path, epoch: int, model, optimizer, scheduler, state: dict,
                     rng_states: list[tuple[dict, dict]] | None = None) -> Path:
    """Write epoch `epoch` into a temp folder of `output_dir` and return it (not yet a checkpoint).

    rng_states: `rng_state()` of every rank, in rank order (default: this process's)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_PARTIAL}{epoch:03d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model = _unwrap(model)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
    tensors, rest = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(rest))
    for rank, (rng, meta) in enumerate(rng_states or [rng_state()]):
        save_file(rng, str(tmp / f"rng-rank{rank}.safetensors"), metadata=meta)
    (tmp / "state.json").write_text(json.dumps(dict(state, epoch=epoch, scheduler=scheduler.state_dict())))
    return tmp


def publish_checkpoint(tmp: str | Path, keep: int = 3) -> Path:
    """Rename a written temp folder to `epoch-NNN` (one atomic step) and drop all but the last `keep`."""
    tmp = Path(tmp)
    epoch = tmp.name[len(_PARTIAL):].split("-")[0]  # .tmp-epoch-003-4242 -> 003
    final = tmp.parent / f"epoch-{epoch}"
    if final.exists():  # re-saving the same epoch (resume after a crash during cleanup)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(tmp.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(output_dir: str | Path) -> list[Path]:
    """Delete the temp folders a killed run left while saving; return them."""
    root = Path(output_dir)
    partial = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PARTIAL)] if root.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def record_run(output_dir: str | Path, run_id: str) -> None:
    """Write run.json (atomically: a reader sees the old file or the new one, never half)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".run.json.{os.getpid()}"
    tmp.write_text(json.dumps({"run_id": run_id}))
    os.replace(tmp, root / RUN_FILE)


def recorded_run_id(output_dir: str | Path) -> str | None:
    try:
        return json.loads((Path(output_dir) / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def rng_state(device: torch.device | None = None) -> tuple[dict, dict]:
    """This process's generators: torch CPU (+ its CUDA device's) as tensors, python/numpy as JSON metadata."""
    tensors = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":  # only this rank's device: no context on the others
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    meta = {"python": json.dumps(_py_rng(random.getstate())),
            "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]])}
    return tensors, meta


def _py_rng(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def load_checkpoint(folder: str | Path, model, optimizer, scheduler, rank: int = 0,
                    device: torch.device | None = None) -> dict:
    """Restore weights, optimizer, schedule and this rank's RNG; return state.json's dict."""
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
    _load_rng(folder, state, rank, device)
    return state


def _load_rng(folder: Path, state: dict, rank: int, device: torch.device | None) -> None:
    path = folder / f"rng-rank{rank}.safetensors"
    if not path.is_file():  # more ranks than when saved: rank 0's state (the run no longer replays exactly)
        path = folder / "rng-rank0.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        rng, python, numpy = load_file(str(path)), json.loads(meta["python"]), json.loads(meta["numpy"])
    else:  # a checkpoint written before per-rank files: rng.safetensors, python/numpy in state.json
        rng, python, numpy = load_file(str(folder / "rng.safetensors")), state["python_rng"], state["numpy_rng"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    elif torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if re.fullmatch(r"cuda\d+", k))]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = numpy
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
