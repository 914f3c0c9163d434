"""Parallel trials on a multi-GPU box: each trial gets a GPU of its own (CUDA_VISIBLE_DEVICES).

    python train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=4      # 4 trials at once, one per GPU

The sweeper checks that N trials at once fit the GPUs it can see (CUDA_VISIBLE_DEVICES's
list, else every GPU) and gives the k-th trial of a batch the k-th GPU through
hydra.job.env_set. A joblib worker process is reused from batch to batch, and CUDA reads
CUDA_VISIBLE_DEVICES once per process, so the worker then claims its GPU for its whole
life with an exclusive lock file in the sweep's folder: the sweeper's choice when it is
free, else any free one. Two live workers never share a GPU; a worker that dies releases
its lock. One trial at a time (the basic launcher), or no GPU: nothing is placed.
"""
from __future__ import annotations

import os
from pathlib import Path

from phitune.errors import PhituneError

ENV_DEVICES = "PHITUNE_TRIAL_DEVICES"  # the GPUs the sweep's trials share, e.g. "0,1,2,3"
ENV_LOCKS = "PHITUNE_TRIAL_DEVICE_LOCKS"  # the folder of their lock files
CUDA_ENV = "CUDA_VISIBLE_DEVICES"


# -- pure: what the sweeper decides ------------------------------------------------------------

def visible_devices(cuda_visible: str | None, count: int) -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES's entries when it is set
    (ids or UUIDs, as CUDA reads them), else 0..count-1."""
    if cuda_visible is not None:
        return [d.strip() for d in cuda_visible.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(count)]


def plan_devices(n_jobs: int, parallel: bool, devices: list[str]) -> list[str] | None:
    """The GPUs the sweep's trials are placed on, or None when nothing is placed."""
    if not parallel or n_jobs <= 1 or not devices:
        return None
    if n_jobs > len(devices):
        raise PhituneError(f"hydra.launcher.n_jobs={n_jobs}: parallel trials each take one GPU and this machine shows "
                           f"{len(devices)} ({CUDA_ENV}={','.join(devices)}); set hydra.launcher.n_jobs to at most "
                           f"{len(devices)}")
    return list(devices)


def assign(n_trials: int, devices: list[str]) -> list[str]:
    """The GPU the sweeper proposes to each trial of a batch (a batch is at most len(devices))."""
    return [devices[i % len(devices)] for i in range(n_trials)]


def claim_order(devices: list[str], preferred: str | None) -> list[str]:
    """The order a worker tries the GPUs in: the sweeper's proposal first."""
    return ([preferred] if preferred in devices else []) + [d for d in devices if d != preferred]


# -- in the worker: hold one GPU for the process's life -----------------------------------------

_HELD: dict = {}  # {"device": id, "lock": open file}: CUDA starts once per process


def bind() -> str | None:
    """In a trial's process: this process's GPU, claimed on its first trial, exported as
    CUDA_VISIBLE_DEVICES; None outside a placed sweep."""
    import fcntl

    listed = os.environ.get(ENV_DEVICES)
    if not listed:
        return None
    if "device" not in _HELD:
        devices = listed.split(",")
        folder = Path(os.environ[ENV_LOCKS])
        folder.mkdir(parents=True, exist_ok=True)
        for device in claim_order(devices, os.environ.get(CUDA_ENV)):
            lock = open(folder / f"gpu-{device}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue
            _HELD.update(device=device, lock=lock)
            break
        else:
            raise PhituneError(f"every GPU of this sweep ({listed}) is held by another of its trial processes: "
                               "lower hydra.launcher.n_jobs")
    os.environ[CUDA_ENV] = _HELD["device"]
    return _HELD["device"]


def gpu_count() -> int:
    """GPUs torch sees (NVML's count: no CUDA context is created in the sweeper)."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        return 0


def for_sweep(n_jobs: int, launcher_target: str | None, backend_device: str | None) -> list[str] | None:
    """The sweep's GPUs to place trials on: only for a launcher that runs trials at once
    (joblib), more than one at a time, on a backend that may use CUDA."""
    parallel = bool(launcher_target) and not str(launcher_target).endswith("BasicLauncher")
    if not parallel or n_jobs <= 1 or str(backend_device or "auto") not in ("auto", "cuda"):
        return None
    return plan_devices(n_jobs, True, visible_devices(os.environ.get(CUDA_ENV), gpu_count()))
