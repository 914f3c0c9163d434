"""Where a run goes (`backend=local|azureml|foundry`) and what each backend can do.

    backend   single run                     sweep (`python train.py -m`)           objective here
    local     trains in this process         Optuna, each trial a job of this run   yes
    azureml   one Azure ML command job       handed to Azure as one sweep job       no (in Azure)
    foundry   one Azure AI Foundry job       none                                   no

Tasks: local and azureml run phitune's own training, so every task (`task=chat|classification`);
foundry fine-tunes chat models only.

`lookup(name, mode, task)` is asked before anything is created or sent: the recipe asks it
for a run, the sweeper for a sweep, so an unsupported combination is one line and exit 1.
Cheap to import (no torch, no Azure SDK): train.py asks it before any heavy import.
"""
from __future__ import annotations

from dataclasses import dataclass

from phitune.errors import PhituneError

MODES = ("run", "sweep", "trial")  # trial: one job of a local Optuna sweep, which must return its objective


@dataclass(frozen=True)
class Backend:
    name: str
    run: str  # what `python train.py backend=NAME` does
    sweep: str | None  # how `-m` runs: "optuna" (trials in this process), "azure" (one Azure sweep job), None
    objective: bool  # run() returns the value a sweep optimises to this process
    no_sweep: str = ""  # why there is no sweep, and what to use instead
    tasks: tuple = ("chat", "classification")  # phitune.tasks it can train


BACKENDS = {
    "local": Backend("local", "trains in this process (CPU, one GPU, or torchrun)", sweep="optuna", objective=True),
    "azureml": Backend("azureml", "submits one Azure ML command job", sweep="azure", objective=False),
    "foundry": Backend("foundry", "submits one Azure AI Foundry fine-tuning job", sweep=None, objective=False,
                       no_sweep="Azure AI Foundry fine-tunes with fixed hyperparameters and returns no objective to "
                                "optimise; sweep with backend=azureml, or run single jobs with backend=foundry",
                       tasks=("chat",)),
}


def lookup(name, mode: str = "run", task: str = "chat") -> Backend:
    """The backend called `name`, if it can do `mode` for `task`; else PhituneError saying what to set."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    backend = BACKENDS.get(str(name))
    if backend is None:
        raise PhituneError(f"backend.name={name}: no such backend; use backend={'|'.join(BACKENDS)}")
    if str(task) not in backend.tasks:
        raise PhituneError(f"backend={backend.name} cannot train task={task}: Azure AI Foundry fine-tunes chat "
                           "models only (no classification head); use backend=azureml, which runs phitune's own "
                           "training on Azure ML compute, or backend=local")
    if mode == "sweep" and backend.sweep is None:
        raise PhituneError(f"backend={backend.name} cannot run a sweep: {backend.no_sweep}")
    if mode == "trial" and not backend.objective:
        # A local Optuna sweep whose trials each submit a job elsewhere would wait on nothing.
        why = backend.no_sweep or "the job's objective stays in Azure and never reaches this study"
        fix = "" if backend.no_sweep else f"; run the sweep as python train.py -m backend={backend.name}"
        raise PhituneError(f"backend={backend.name} cannot run a trial of a local Optuna sweep: {why}{fix}")
    return backend
