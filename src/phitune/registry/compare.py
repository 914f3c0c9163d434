"""The leaderboard of `phitune compare`: runs ranked by a metric, failures last.

Rows: every training run of an experiment (sweep parents and evaluation runs left
out), or every trial of one sweep. Order: finished runs that have the metric, best
first (lower is better for *loss / perplexity, higher for *accuracy, unless told);
then finished runs without it, running, pruned, killed and failed runs, each by
trial number. Params shown: for a sweep, the ones its parent run lists as its
search space (`space.<name>`); otherwise the params whose values differ across the
runs shown (derived.*, tracking.* and trial.* left out).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Optional

from phitune.registry import store

STANDARD_METRICS = ("full_valid_loss", "full_valid_mean_token_accuracy", "perplexity", "full_valid_macro_f1",
                    "full_valid_accuracy")
_STATE_ORDER = {"finished": 0, "running": 1, "pruned": 2, "killed": 3, "failed": 4}
_NOT_SWEPT_PREFIXES = ("derived.", "tracking.", "trial.")
_NOT_SWEPT = {"train.output_dir", "train.progress", "resume"}


@dataclass
class Row:
    rank: Optional[int]
    run_id: str
    run_name: str
    trial: Optional[int]
    state: str
    params: dict
    metrics: dict
    value: Optional[float]  # the ranking metric
    start_time: int = 0


@dataclass
class Leaderboard:
    metric: str
    direction: str
    rows: list
    params: list  # param columns
    metrics: list  # metric columns (the ranking metric first)
    experiment: str = ""
    sweep: Optional[str] = None  # parent run id
    study: Optional[str] = None
    hidden: int = 0  # rows cut by --top
    extra: dict = field(default_factory=dict)


def _value(run, metric: str) -> Optional[float]:
    v = run.data.metrics.get(metric)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _sort_key(row: Row, direction: str):
    state = _STATE_ORDER.get(row.state, 5)
    trial = row.trial if row.trial is not None else 1 << 30
    if state == 0 and row.value is not None:
        return (0, row.value if direction == "min" else -row.value, trial, row.start_time)
    return (1 + state, 0.0, trial, row.start_time)


def swept_params(runs: list, parent=None) -> list:
    if parent is not None:
        names = sorted(k[len("space."):] for k in parent.data.params if k.startswith("space."))
        if names:
            return names
    keys = sorted({k for r in runs for k in r.data.params})
    out = []
    for k in keys:
        if k in _NOT_SWEPT or k.startswith(_NOT_SWEPT_PREFIXES):
            continue
        if len({r.data.params.get(k) for r in runs}) > 1:
            out.append(k)
    return out


def leaderboard(client, *, experiment: Optional[str] = None, sweep: Optional[str] = None,
                metric: Optional[str] = None, direction: Optional[str] = None, top: Optional[int] = None) -> Leaderboard:
    """metric None: the runs' task's (store.task_metric)."""
    runs, parent = store.select_runs(client, experiment=experiment, sweep=sweep)
    metric = metric or store.task_metric(runs)
    store.check_metric(runs, metric)
    direction = store.direction_for(metric, direction)
    rows = [Row(rank=None, run_id=r.info.run_id, run_name=r.info.run_name or "", trial=store.trial_number(r),
                state=store.run_state(r), params=dict(r.data.params), metrics=dict(r.data.metrics),
                value=_value(r, metric), start_time=r.info.start_time or 0) for r in runs]
    rows.sort(key=lambda row: _sort_key(row, direction))
    rank = 0
    for row in rows:
        if row.state == "finished" and row.value is not None:
            rank += 1
            row.rank = rank
    hidden = 0
    if top is not None and top >= 0 and len(rows) > top:
        hidden = len(rows) - top
        rows = rows[:top]
    shown_runs = [r for r in runs if r.info.run_id in {row.run_id for row in rows}]
    params = swept_params(shown_runs, parent)
    metrics = [metric] + [m for m in STANDARD_METRICS if m != metric and any(m in row.metrics for row in rows)]
    if parent is not None:
        exp_name = client.get_experiment(parent.info.experiment_id).name
    else:
        exp_name = experiment or store.DEFAULT_EXPERIMENT
    return Leaderboard(metric=metric, direction=direction, rows=rows, params=params, metrics=metrics,
                       experiment=exp_name, sweep=parent.info.run_id if parent is not None else None,
                       study=parent.data.tags.get("phitune.study") if parent is not None else None, hidden=hidden)


# -- output ------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def _num(text):
    """A param value for the table: 0.7319876543 -> 0.732 (params are strings in MLflow)."""
    if text is None:
        return "-"
    try:
        f = float(text)
    except (TypeError, ValueError):
        return str(text)
    return str(text) if str(text).lstrip("-").isdigit() else f"{f:.4g}"


def to_records(lb: Leaderboard) -> list[dict]:
    return [{"rank": r.rank, "run_id": r.run_id, "run_name": r.run_name, "trial": r.trial, "state": r.state,
             "params": {p: r.params.get(p) for p in lb.params},
             "metrics": {m: r.metrics.get(m) for m in lb.metrics}} for r in lb.rows]


def to_json(lb: Leaderboard) -> str:
    return json.dumps({"experiment": lb.experiment, "sweep": lb.sweep, "study": lb.study, "metric": lb.metric,
                       "direction": lb.direction, "hidden": lb.hidden, "rows": to_records(lb)}, indent=2)


def to_csv(lb: Leaderboard) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "run_id", "run_name", "trial", "state", *lb.params, *lb.metrics])
    for r in lb.rows:
        w.writerow(["" if r.rank is None else r.rank, r.run_id, r.run_name, "" if r.trial is None else r.trial,
                    r.state, *[r.params.get(p, "") for p in lb.params],
                    *["" if r.metrics.get(m) is None else repr(float(r.metrics[m])) for m in lb.metrics]])
    return buf.getvalue()


def _short(param: str) -> str:
    return param[len("train."):] if param.startswith("train.") else param


def to_table(lb: Leaderboard) -> str:
    what = f"sweep {lb.sweep}" + (f" (study {lb.study})" if lb.study else "") if lb.sweep else f"experiment {lb.experiment}"
    better = "lower" if lb.direction == "min" else "higher"
    head = f"{what}: {len(lb.rows) + lb.hidden} runs, ranked by {lb.metric} ({better} is better)"
    if not lb.rows:
        return head + "\n(no runs)"
    header = ["rank", "run", "name", "trial", "state", *[_short(p) for p in lb.params], *lb.metrics]
    body = [[_fmt(r.rank), r.run_id[:8], r.run_name[:24], _fmt(r.trial), r.state,
             *[_num(r.params.get(p)) for p in lb.params], *[_fmt(r.metrics.get(m)) for m in lb.metrics]]
            for r in lb.rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = [head, "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    if lb.hidden:
        lines.append(f"... {lb.hidden} more run(s) not shown (--top)")
    return "\n".join(lines)


def render(lb: Leaderboard, fmt: str = "table") -> str:
    return {"table": to_table, "csv": to_csv, "json": to_json}[fmt](lb)
