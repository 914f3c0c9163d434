"""The label set: class id = position in a sorted list, saved next to the weights as labels.json."""
from __future__ import annotations

import json
from pathlib import Path

LABELS_FILE = "labels.json"


def label_set(labels, fixed=None) -> list[str]:
    """`fixed` (task.labels) as given, else the distinct labels sorted: the same file, the same ids."""
    return [str(x) for x in fixed] if fixed else sorted({str(x) for x in labels})


def save_labels(folder, labels: list[str]) -> Path:
    path = Path(folder) / LABELS_FILE
    path.write_text(json.dumps({"labels": list(labels)}, ensure_ascii=False, indent=1) + "\n")
    return path


def load_labels(folder) -> list[str] | None:
    """The labels saved with a model, or None when the folder holds no classifier."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    return [str(x) for x in json.loads(path.read_text())["labels"]]
