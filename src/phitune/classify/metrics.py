"""Accuracy, macro-F1 and per-class precision / recall / F1 from a confusion matrix.

One home for the arithmetic: the training loop's valid_* / full_valid_* metrics, the
`classification` evaluate module (src/phitune/metrics/classification, what
`phitune eval` loads by path) and the end-of-run report all call scores().

Conventions, those of scikit-learn's defaults (zero_division=0): a class's precision is
0 when it is never predicted, its recall 0 when it has no example; macro-F1 is the
unweighted mean F1 over the classes that occur in the references or the predictions, so
a class absent from both (nothing to be right or wrong about) does not pull it down.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion(references: Sequence[int], predictions: Sequence[int], n_classes: int) -> np.ndarray:
    """[n, n] counts: row = true class, column = predicted class."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(references, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def scores(matrix, labels: Sequence[str] | None = None) -> dict:
    """{accuracy, macro_f1, per_class: {label: {precision, recall, f1, support}}, confusion_matrix}."""
    m = np.asarray(matrix, dtype=np.float64)
    labels = list(labels) if labels is not None else [str(i) for i in range(len(m))]
    tp, support, predicted = np.diag(m), m.sum(1), m.sum(0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support + predicted) > 0
    total = m.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(labels, precision, recall, f1, support)},
        "confusion_matrix": m.astype(np.int64).tolist(),
    }


def per_class_metrics(result: dict, prefix: str = "") -> dict:
    """MLflow names for scores()'s per-class figures: `{prefix}precision_<label>` etc."""
    out = {}
    for label, figures in result["per_class"].items():
        for key in ("precision", "recall", "f1"):
            out[f"{prefix}{key}_{_metric_safe(label)}"] = figures[key]
    return out


def _metric_safe(label: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in label)


def plot_confusion(matrix, labels: Sequence[str], path, title: str = "confusion matrix"):
    """A PNG of the matrix (rows true, columns predicted), counts written in each cell."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    size = 2.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
