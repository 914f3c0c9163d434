"""Optuna's plots of a study as PNG files (matplotlib backend, no display needed).

Each plot is skipped with a reason rather than failing the sweep: parameter
importances need at least two complete trials with some variation, and every plot
needs at least one complete trial.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice")


def save_plots(study, out_dir: Path, target_name: str = "Objective Value") -> tuple[list[Path], dict[str, str]]:
    """Write PLOTS into out_dir; returns (files written, {plot: why skipped})."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written, skipped = [], {}
    mpl_log = logging.getLogger("matplotlib")
    level = mpl_log.level
    mpl_log.setLevel(logging.WARNING)  # "Using categorical units..." at INFO for each choice() param
    try:
        for name in PLOTS:
            _plot(study, name, complete, out_dir, written, skipped, target_name)
    finally:
        mpl_log.setLevel(level)
    return written, skipped


def _plot(study, name: str, complete: list, out_dir: Path, written: list, skipped: dict, target_name: str) -> None:
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    if not complete:
        skipped[name] = "no complete trial"
        return
    if name == "param_importances" and len(complete) < 2:
        skipped[name] = "needs at least 2 complete trials"
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental", empty-plot and layout warnings
            fig = _figure(getattr(ovm, f"plot_{name}")(study, target_name=target_name))
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    except Exception as exc:  # e.g. importances of a parameter that never varied
        skipped[name] = f"{type(exc).__name__}: {exc}"
        plt.close("all")


def _figure(result):
    """plot_* return an Axes, or an array of Axes (one per parameter for slice)."""
    try:
        return result.figure
    except AttributeError:
        return result.flatten()[0].figure
