"""Run states, tags and metric directions shared by compare, promote and models
(the store itself is opened by phitune.models.uri.client_for)."""
from __future__ import annotations

from typing import Optional

from phitune.errors import PhituneError

DEFAULT_EXPERIMENT = "phitune"
TRIAL_TAG = "phitune.trial_number"
STATE_TAG = "phitune.trial_state"
ROLE_TAG = "phitune.role"  # "sweep" on a sweep's parent run, "eval" on an evaluation run
EVAL_OF_TAG = "phitune.eval_of"
# phitune.trial_state (set by the sweeper) -> leaderboard state
_TRIAL_STATES = {"complete": "finished", "pruned": "pruned", "failed": "failed", "killed": "killed"}
_RUN_STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed", "RUNNING": "running",
               "SCHEDULED": "running"}
# name fragments -> direction, checked in order; anything else needs --direction
_DIRECTIONS = (("loss", "min"), ("perplexity", "min"), ("objective", "min"), ("accuracy", "max"), ("f1", "max"),
               ("exact_match", "max"), ("rouge", "max"), ("bleu", "max"))


def direction_for(metric: str, explicit: Optional[str] = None) -> str:
    """"min" or "max": lower is better for *loss / perplexity, higher for *accuracy, F1, ..."""
    if explicit:
        d = {"min": "min", "minimize": "min", "lower": "min", "max": "max", "maximize": "max",
             "higher": "max"}.get(explicit.lower())
        if d is None:
            raise PhituneError(f"--direction {explicit}: expected min or max")
        return d
    name = metric.lower()
    for fragment, direction in _DIRECTIONS:
        if fragment in name:
            return direction
    raise PhituneError(f"metric {metric}: is lower or higher better? say --direction min or --direction max")


def task_metric(runs: list) -> str:
    """The metric the runs' task is judged by (phitune.tasks, the `phitune.task` tag; untagged
    runs are chat): full_valid_loss, or full_valid_macro_f1 for classification."""
    from phitune.tasks import TASK_TAG, lookup

    names = sorted({r.data.tags.get(TASK_TAG) or "chat" for r in runs})
    if len(names) > 1:
        raise PhituneError(f"these runs are of several tasks ({', '.join(names)}): say which metric with --metric")
    return lookup(names[0] if names else "chat").objective


def check_metric(runs: list, metric: str) -> None:
    """A metric that no run has is a typo to report with the names there are, not a
    leaderboard of dashes (nothing to check when there are no runs)."""
    known = sorted({k for r in runs for k in r.data.metrics})
    if runs and metric not in known:
        raise PhituneError(f"--metric {metric}: none of these {len(runs)} run(s) has it; the metrics they have: "
                           + (", ".join(known) or "none"))


def better(a: float, b: float, direction: str) -> bool:
    return a < b if direction == "min" else a > b


def run_state(run) -> str:
    """finished | pruned | failed | killed | running (a sweep's tag wins over the run status)."""
    tag = run.data.tags.get(STATE_TAG)
    if tag in _TRIAL_STATES:
        state = _TRIAL_STATES[tag]
        # a trial tagged complete whose run still failed to end cleanly counts as that
        return state if state != "finished" or run.info.status == "FINISHED" else _RUN_STATUS.get(run.info.status, "failed")
    return _RUN_STATUS.get(run.info.status, run.info.status.lower())


def trial_number(run) -> Optional[int]:
    value = run.data.tags.get(TRIAL_TAG)
    return int(value) if value is not None and str(value).isdigit() else None


def is_training_run(run) -> bool:
    """Not a sweep's parent and not an evaluation run."""
    tags = run.data.tags
    return tags.get(ROLE_TAG) not in ("sweep", "eval") and EVAL_OF_TAG not in tags


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise PhituneError(f"no experiment {name!r} in the tracking store"
                           + (f" (there are: {', '.join(known)})" if known else " (it has no experiments yet)"))
    return exp.experiment_id


def search_all(client, experiment_ids: list, filter_string: str = "", order_by=None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def resolve_sweep(client, sweep: str, experiment: Optional[str]):
    """A sweep's parent run: its id, or `latest` = the newest sweep in the experiment."""
    from mlflow.exceptions import MlflowException

    if sweep == "latest":
        exp_id = experiment_id(client, experiment or DEFAULT_EXPERIMENT)
        parents = client.search_runs([exp_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1,
                                     order_by=["attributes.start_time DESC"])
        if not parents:
            raise PhituneError(f"no sweep in experiment {experiment or DEFAULT_EXPERIMENT!r} (python train.py -m starts one)")
        return parents[0]
    try:
        run = client.get_run(sweep)
    except MlflowException:
        raise PhituneError(f"--sweep {sweep}: no such run in the tracking store") from None
    if run.data.tags.get(ROLE_TAG) != "sweep":
        raise PhituneError(f"--sweep {sweep}: a run, but not a sweep's parent run (python train.py -m makes one; "
                           "--sweep latest picks the newest)")
    return run


def select_runs(client, experiment: Optional[str] = None, sweep: Optional[str] = None,
                run: Optional[str] = None) -> tuple[list, Optional[object]]:
    """(training runs, the sweep's parent run or None) for one of --run, --sweep, --experiment."""
    from mlflow.exceptions import MlflowException

    if run:
        try:
            return [client.get_run(run)], None
        except MlflowException:
            raise PhituneError(f"--run {run}: no such run in the tracking store") from None
    if sweep:
        parent = resolve_sweep(client, sweep, experiment)
        children = search_all(client, [parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        return [r for r in children if is_training_run(r)], parent
    exp_id = experiment_id(client, experiment or DEFAULT_EXPERIMENT)
    return [r for r in search_all(client, [exp_id]) if is_training_run(r)], None
