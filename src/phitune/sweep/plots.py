"""Optuna's plots of a study: PNG files (matplotlib, no display needed) and the same
plots as interactive Plotly figures in one HTML file, which MLflow's artifact view shows.

    plots/optimization_history.png     objective of each complete trial, and the best so far
    plots/intermediate_values.png      each trial's reports by step: pruned trials end early here
    plots/param_importances.png        only from MIN_IMPORTANCE_TRIALS complete trials on
    plots/parallel_coordinate.png      plots/slice.png
    plots/optuna_plots.html            all of them, interactive; plotly.js embedded once (~4.8 MB):
                                       the UI may have no network, and MLflow shows one file alone

Each plot is skipped with a reason rather than failing the sweep.
"""
from __future__ import annotations

import html
import logging
import warnings
from pathlib import Path

PLOTS = ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate", "slice")
HTML_FILE = "optuna_plots.html"
# fANOVA importances from a handful of trials are noise (3 trials gave 1.00 vs <0.01).
MIN_IMPORTANCE_TRIALS = 5
# Inches at DPI: 14 x 7 in at 100 dpi = 1400 x 700 px (a little less once cropped), room
# for axis names and tick labels.
PNG_INCHES = (14.0, 7.0)
SLICE_INCHES_PER_PARAM = 4.5
DPI = 100


def save_plots(study, out_dir: Path, target_name: str = "Objective Value") -> tuple[list[Path], dict[str, str]]:
    """Write the PNGs and the HTML into out_dir; returns (files written, {plot: why skipped})."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped, figures = [], {}, []
    mpl_log = logging.getLogger("matplotlib")
    level = mpl_log.level
    mpl_log.setLevel(logging.WARNING)  # "Using categorical units..." at INFO for each choice() param
    try:
        for name in PLOTS:
            why = why_not(study, name)
            if why:
                skipped[name] = why
                continue
            _png(study, name, out_dir, written, skipped, target_name)
            figures += _plotly(study, name, skipped, target_name)
    finally:
        mpl_log.setLevel(level)
    if figures:
        written.append(_write_html(figures, skipped, out_dir / HTML_FILE, study.study_name))
    return written, skipped


def why_not(study, name: str) -> str | None:
    """Why plot `name` would say nothing about this study, or None."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if name == "intermediate_values":
        return None if any(t.intermediate_values for t in trials) else "no trial reported intermediate values"
    if not complete:
        return "no complete trial"
    if name == "param_importances" and len(complete) < MIN_IMPORTANCE_TRIALS:
        return (f"needs at least {MIN_IMPORTANCE_TRIALS} complete trials, the study has {len(complete)}: "
                "importances from fewer trials are noise")
    return None


def _kwargs(name: str, target_name: str) -> dict:
    return {} if name == "intermediate_values" else {"target_name": target_name}


def _png(study, name: str, out_dir: Path, written: list, skipped: dict, target_name: str) -> None:
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental", empty-plot and layout warnings
            result = getattr(ovm, f"plot_{name}")(study, **_kwargs(name, target_name))
            fig = _figure(result)
            width, height = PNG_INCHES
            if name == "slice":  # one panel per parameter, side by side
                width = max(width, SLICE_INCHES_PER_PARAM * len(getattr(result, "flatten", lambda: [result])()))
            fig.set_size_inches(width, height)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    except Exception as exc:  # e.g. importances of a parameter that never varied
        skipped[name] = f"{type(exc).__name__}: {exc}"
        plt.close("all")


def _plotly(study, name: str, skipped: dict, target_name: str) -> list:
    try:
        import optuna.visualization as ov

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = getattr(ov, f"plot_{name}")(study, **_kwargs(name, target_name))
        fig.update_layout(height=560, autosize=True)
        return [(name, fig)]
    except ImportError:  # plotly not installed: the PNGs stay
        skipped.setdefault("html", "plotly is not installed (pip install plotly)")
    except Exception as exc:
        skipped.setdefault(f"{name}.html", f"{type(exc).__name__}: {exc}")
    return []


def _write_html(figures: list, skipped: dict, path: Path, study_name: str) -> Path:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study_name)}</title></head>"
             "<body style='font-family:sans-serif;margin:16px'>",
             f"<h1>Sweep {html.escape(study_name)}</h1>"]
    for i, (name, fig) in enumerate(figures):
        parts.append(f"<h2>{name.replace('_', ' ')}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"responsive": True}))
    if skipped:
        parts.append("<h2>not shown</h2><ul>" + "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in skipped.items()) + "</ul>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _figure(result):
    """plot_* return an Axes, or an array of Axes (one per parameter for slice)."""
    try:
        return result.figure
    except AttributeError:
        return result.flatten()[0].figure
