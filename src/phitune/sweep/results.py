"""What a sweep leaves when it ends: optimization_results.yaml and trials.csv in the
sweep directory, and on the parent run the best value and params, the trials table
and Optuna's plots."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from phitune.sweep.axis import PLANNED_ATTR
from phitune.sweep.study import (DISCARDED_ATTR, ERROR_ATTR, MLFLOW_RUN_ATTR, TOKENS_ATTR, best_trial,
                                 superseded_numbers)


def trials_table(study) -> list[dict]:
    """One row per trial; retried ones say which trial re-ran them, discarded ones are left out."""
    trials = study.get_trials(deepcopy=False)
    gone = superseded_numbers(trials)
    retried_by = {}
    for t in trials:
        for n in t.system_attrs.get("retry_history", []):
            retried_by[n] = t.number
    rows = []
    for t in trials:
        if t.user_attrs.get(DISCARDED_ATTR):
            continue
        rows.append({
            "number": t.number,
            "state": t.state.name,
            **({"value": t.value} if len(study.directions) == 1 else
               {f"values_{i}": v for i, v in enumerate(t.values or [None] * len(study.directions))}),
            **{f"params.{k}": v for k, v in t.params.items()},
            "last_step": t.last_step,
            "train_tokens": t.user_attrs.get(TOKENS_ATTR),
            "planned_tokens": t.user_attrs.get(PLANNED_ATTR),
            "duration_s": t.duration.total_seconds() if t.duration else None,
            "retry_of": t.system_attrs.get("failed_trial"),
            "retried_by": retried_by.get(t.number) if t.number in gone else None,
            "mlflow_run_id": t.user_attrs.get(MLFLOW_RUN_ATTR),
            "error": t.user_attrs.get(ERROR_ATTR),
        })
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    import csv

    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return path


def compute_spent(study) -> dict:
    """Training tokens the sweep's trials trained, and what they would have trained unpruned.

    Every trial that ran counts (complete, pruned, failed, retried) at the tokens it trained;
    unpruned, a pruned trial would also have trained the rest of its planned tokens
    (phitune.sweep.axis.PLANNED_ATTR, recorded by the job). `unpruned` is None when a pruned
    trial recorded no plan (an app that does not call TrialReporter.plan)."""
    from optuna.trial import TrialState

    spent = unpruned = seconds = 0
    unknown = pruned = 0
    for t in study.get_trials(deepcopy=False):
        tokens = int(t.user_attrs.get(TOKENS_ATTR) or 0)
        spent += tokens
        seconds += t.duration.total_seconds() if t.duration else 0.0
        if t.state == TrialState.PRUNED:
            pruned += 1
            planned = t.user_attrs.get(PLANNED_ATTR)
            unknown += planned is None
            tokens = max(tokens, int(planned or 0))
        unpruned += tokens
    return {"tokens": spent, "unpruned": None if unknown else unpruned, "pruned": pruned, "seconds": seconds,
            "ratio": spent / unpruned if unpruned and not unknown else None}


def compute_line(c: dict) -> str:
    """`123,456 training tokens: 0.38 of the 321,000 an unpruned sweep would have trained (9 trials pruned)`."""
    head = f"{c['tokens']:,} training tokens"
    if c["unpruned"] is None:
        return head + f"; what {c['pruned']} pruned trial(s) would have trained is unknown (no planned length recorded)"
    return head + (f": {c['ratio']:.2f} of the {c['unpruned']:,} an unpruned sweep would have trained"
                   f" ({c['pruned']} trial{'s' if c['pruned'] != 1 else ''} pruned)" if c["ratio"] is not None else "")


def results_dict(study) -> dict:
    """optimization_results.yaml, with the Hydra Optuna sweeper's keys first: `name`, then
    `best_params` and `best_value`, or for several objectives `solutions` (the Pareto front,
    each with its `params` and `values`)."""
    if len(study.directions) > 1:
        return {"name": "optuna", "solutions": pareto_front(study), "study_name": study.study_name}
    best = best_trial(study)
    return {"name": "optuna",
            "best_params": dict(best.params) if best else {},
            "best_value": float(best.value) if best else None,
            "study_name": study.study_name,
            "best_trial": best.number if best else None}


def pareto_front(study) -> list[dict]:
    """The COMPLETE trials that no other trial dominates, by trial number."""
    return [{"params": dict(t.params), "values": [float(v) for v in t.values], "number": t.number}
            for t in sorted(study.best_trials, key=lambda t: t.number)]


def write_results(study, sweep_dir: Path, counts, n_trials: int, stop_reason: str | None) -> Path:
    from omegaconf import OmegaConf

    sweep_dir.mkdir(parents=True, exist_ok=True)
    data = dict(results_dict(study), n_trials=n_trials,
                trials={"complete": counts.complete, "pruned": counts.pruned, "failed": counts.failed},
                train_tokens=counts.tokens, train_tokens_unpruned=compute_spent(study)["unpruned"], stopped=stop_reason)
    path = sweep_dir / "optimization_results.yaml"
    OmegaConf.save(OmegaConf.create(data), path)
    write_csv(trials_table(study), sweep_dir / "trials.csv")
    return path


def parent_run_name(study_name: str, metric: str, best) -> str:
    """`sweep-NAME · best trial-3 full_valid_loss 0.8123`: the parent row says the result even collapsed."""
    if best is None or not math.isfinite(best.value):
        return f"sweep-{study_name}"
    return f"sweep-{study_name} · best trial-{best.number} {metric} {best.value:.4g}"


def _best_run_id(best) -> str | None:
    return best.user_attrs.get(MLFLOW_RUN_ATTR) if best is not None else None


def summary_note(study, metric: str, counts, best, best_run_id: str | None) -> str:
    """The parent run's description (MLflow shows it on the run's page), in Markdown."""
    lines = [f"**Sweep {study.study_name}**: {counts.finished} trials: {counts.complete} complete, "
             f"{counts.pruned} pruned, {counts.failed} failed.", ""]
    if best is not None and math.isfinite(best.value):
        params = ", ".join(f"`{k}={v}`" for k, v in best.params.items())
        link = f" (run `{best_run_id}`)" if best_run_id else ""
        lines += [f"Best: trial {best.number}{link}, {metric} **{best.value:.6g}**, with {params}.", ""]
    elif len(study.directions) > 1:
        lines += [f"{len(study.best_trials)} Pareto-optimal trial(s): see pareto_front.json.", ""]
    else:
        lines += ["No complete trial yet.", ""]
    lines += [f"Compute: {compute_line(compute_spent(study))}.", ""]
    lines.append("Plots: artifacts `plots/` (`optuna_plots.html` is interactive); every trial: `trials.csv`.")
    return "\n".join(lines)


def log_to_parent(parent, study, metric: str, counts, sweep_dir: Path, plots: bool) -> dict[str, str]:
    """Best value/params, the trials table, results YAML and plots on the parent run.
    Returns {plot: why skipped}."""
    from phitune.sweep.parent import mlflow_key
    from phitune.sweep.plots import save_plots

    client, run_id = parent.client, parent.run_id
    best = best_trial(study)  # None for several objectives: their best is a front
    step = counts.finished
    client.log_metric(run_id, "n_complete", counts.complete, step=step)
    client.log_metric(run_id, "n_pruned", counts.pruned, step=step)
    client.log_metric(run_id, "n_failed", counts.failed, step=step)
    client.log_metric(run_id, "train_tokens_total", counts.tokens, step=step)
    spent = compute_spent(study)
    client.log_metric(run_id, "trial_seconds_total", spent["seconds"], step=step)
    if spent["unpruned"] is not None:
        # What pruning saved: the unpruned figure adds the rest of each pruned trial's planned tokens.
        client.log_metric(run_id, "train_tokens_unpruned", spent["unpruned"], step=step)
        client.log_metric(run_id, "train_tokens_saved", spent["unpruned"] - spent["tokens"], step=step)
        if spent["ratio"] is not None:
            client.log_metric(run_id, "pruning_tokens_ratio", spent["ratio"], step=step)
    client.set_tag(run_id, "phitune.compute", compute_line(spent))
    if best is not None and math.isfinite(best.value):
        # Metrics and tags, not params: the best changes as a resumed sweep goes on.
        client.log_metric(run_id, f"best_{metric}", float(best.value), step=step)
        client.set_tag(run_id, "phitune.best_trial", str(best.number))
        for k, v in best.params.items():
            client.set_tag(run_id, mlflow_key(f"best.{k}"), str(v))
        client.set_tag(run_id, "phitune.best_params", " ".join(f"{k}={v}" for k, v in best.params.items()))
        client.log_dict(run_id, {"best_trial": best.number, "best_value": best.value, "best_params": best.params},
                        "best_params.json")
    client.set_tag(run_id, "mlflow.note.content", summary_note(study, metric, counts, best, _best_run_id(best)))
    client.update_run(run_id, name=parent_run_name(study.study_name, metric, best))
    if len(study.directions) > 1:
        front = pareto_front(study)
        client.log_metric(run_id, "n_pareto", len(front), step=step)
        client.log_dict(run_id, front, "pareto_front.json")
    rows = trials_table(study)
    client.log_text(run_id, json.dumps(rows, indent=1, default=str), "trials.json")
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, str(write_csv(rows, Path(tmp) / "trials.csv")))
        results = sweep_dir / "optimization_results.yaml"
        if results.exists():
            client.log_artifact(run_id, str(results))
        if plots and len(study.directions) > 1:
            skipped = {"all": "Optuna's plots take one objective"}
        elif plots:
            files, skipped = save_plots(study, Path(tmp) / "plots", metric)
            for f in files:
                client.log_artifact(run_id, str(f), "plots")
            if skipped:
                client.log_dict(run_id, skipped, "plots/skipped.json")
    return skipped
