"""The line printed as each trial ends:

    trial 7/20 · best full_valid_loss 1.83 (trial 4) · 2 pruned · 1 failed

`7` counts the study's finished trials (all workers, all invocations), not this
process's; the best is over COMPLETE trials only (a pruned trial's last report is
not a final value). With several objectives the best is a front:

    trial 7/20 · 3 Pareto solutions · 0 pruned · 1 failed
"""
from __future__ import annotations


def progress_line(counts, n_trials: int, metric: str, best, pareto: int | None = None) -> str:
    if pareto is not None:
        best_part = f"{pareto} Pareto solution{'s' if pareto != 1 else ''}"
    elif best is not None:
        best_part = f"best {metric} {best.value:.4g} (trial {best.number})"
    else:
        best_part = f"best {metric} - (no complete trial yet)"
    return f"trial {counts.finished}/{n_trials} · {best_part} · {counts.pruned} pruned · {counts.failed} failed"


def outcome_line(number: int, state: str, value: float | None = None, error: str | None = None, metric: str = "",
                 step: int | None = None, tokens: bool = False) -> str:
    """One line about the trial that just ended, printed before the progress line.

    A pruned trial's value is its last report (the job's valid_loss at `step`), not `metric`;
    tokens: its steps are training tokens (phitune's train.py), not the job's own step count.
    """
    if state == "complete" and isinstance(value, (list, tuple)):
        return f"  trial {number} complete: {metric} [{', '.join(f'{v:.4g}' for v in value)}]"
    if state == "complete":
        return f"  trial {number} complete: {metric} {value:.4g}"
    if state == "pruned":
        where = "" if step is None else f" at {step:,} tokens" if tokens else f" at step {step}"
        return f"  trial {number} pruned{where}" + (f" (last report {value:.4g})" if value is not None else "")
    return f"  trial {number} failed: {error}"
