"""Files a run leaves in MLflow: results.csv (Azure's / OpenAI's columns) and the loss curve."""
from __future__ import annotations

import csv
import math
from pathlib import Path

# The columns of the results.csv that Azure AI Foundry and OpenAI attach to a job.
RESULTS_COLUMNS = ["step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                   "full_valid_loss", "full_valid_mean_token_accuracy"]
# task=classification: the same layout with its own figures
CLASSIFICATION_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_macro_f1",
                          "full_valid_loss", "full_valid_accuracy", "full_valid_macro_f1"]


def write_results_csv(history: list[dict], path: Path, columns: list[str] = RESULTS_COLUMNS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in history:
            w.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return path


def plot_loss_curve(history: list[dict], path: Path, title: str = "loss") -> Path:
    # A Figure on the Agg canvas, not pyplot: no display needed, no global figure state, and
    # pyplot's own import (backend selection, every colormap) is skipped; the PNG's bytes are the same.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key, style in (("train_loss", "-"), ("valid_loss", "o-"), ("full_valid_loss", "s--")):
        pts = [(r["step"], r[key]) for r in history if r.get(key) is not None and not math.isnan(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, label=key, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / assistant token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
