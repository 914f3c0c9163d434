"""The tasks a run can learn (`task=chat|classification`), and what each one is judged by.

    task            objective (the final metric run() returns)   direction   data lines
    chat            full_valid_loss                              minimize    {"messages": [...]}
    classification  full_valid_macro_f1                          maximize    {"messages"|"text", "label"}

`phitune compare` and `phitune promote` read a run's `phitune.task` tag to rank by the
task's metric in its direction. Cheap to import (no torch).
"""
from __future__ import annotations

from dataclasses import dataclass

from phitune.errors import PhituneError

TASK_TAG = "phitune.task"


@dataclass(frozen=True)
class Task:
    name: str
    objective: str
    direction: str  # minimize | maximize


TASKS = {
    "chat": Task("chat", "full_valid_loss", "minimize"),
    "classification": Task("classification", "full_valid_macro_f1", "maximize"),
}


def lookup(name) -> Task:
    task = TASKS.get(str(name or "chat"))
    if task is None:
        raise PhituneError(f"task.name={name}: no such task; use task={'|'.join(TASKS)}")
    return task


def of_config(cfg) -> Task:
    return lookup(cfg.get("task", {}).get("name", "chat") if hasattr(cfg, "get") else "chat")


def is_classification(cfg) -> bool:
    return of_config(cfg).name == "classification"
