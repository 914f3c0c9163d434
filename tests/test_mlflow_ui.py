"""A sweep as MLflow shows it: the experiment's kind, trial run names, the best mark, the
plots, and the real `mlflow ui` in a real browser (Debian's chromium driven by Playwright)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sweep_app.harness import REPO, load_study, make_stores, run, runs

CHROMIUM = Path("/usr/bin/chromium")


def _tracking(uri: str, experiment: str):
    return OmegaConf.create({"uri": uri, "experiment": experiment, "artifact_root": None})


def test_experiments_phitune_creates_are_training_experiments(tmp_path):
    """Both homes that create an experiment (a job's, the sweeper's) mark it as machine learning."""
    from mlflow.tracking import MlflowClient

    from phitune.sweep.parent import experiment_id
    from phitune.tracking.experiment import KIND_TAG, TRAINING_KIND, ui_url
    from phitune.tracking.run import setup_tracking

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    made = {setup_tracking(_tracking(uri, "job")), experiment_id(_tracking(uri, "sweep"))}
    client = MlflowClient(uri)
    for exp_id in made:
        exp = client.get_experiment(exp_id)
        assert exp.tags.get(KIND_TAG) == TRAINING_KIND, exp.tags
        assert exp.artifact_location.startswith((tmp_path / "mlruns" / "artifacts").as_uri())
    assert setup_tracking(_tracking(uri, "job")) in made  # found again, not created twice
    assert ui_url("7", "abc") == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"


def test_trial_run_names_say_what_the_trial_tried_and_how_it_ended():
    from phitune.sweep.parent import trial_run_name

    params = {"train.learning_rate_multiplier": 4.6312, "train.batch_size_multiplier": 1, "train.epochs": 2}
    assert trial_run_name(3, params) == "trial-3 lr×4.6 bs×1 ep=2"
    assert trial_run_name(3, params, "pruned", 8) == "trial-3 pruned@8 lr×4.6 bs×1 ep=2"
    # train.py's trials report at training tokens: the name says tokens, not a step count.
    assert trial_run_name(3, params, "pruned", 6568, tokens=True) == "trial-3 pruned@6.6k-tok lr×4.6 bs×1 ep=2"
    assert trial_run_name(3, params, "complete", 8, best=True) == "trial-3 ★ best lr×4.6 bs×1 ep=2"
    assert trial_run_name(0, {"train.lora.rank": 8, "+w": 0.25}) == "trial-0 r=8 w=0.25"


def test_a_pruned_trial_line_says_how_far_it_trained():
    from phitune.sweep.progress import outcome_line

    assert outcome_line(4, "pruned", 5.3216, step=6568, tokens=True) == "  trial 4 pruned at 6,568 tokens (last report 5.322)"
    assert outcome_line(0, "pruned", 1.0214, step=1) == "  trial 0 pruned at step 1 (last report 1.021)"


def _study(n_complete: int, n_pruned: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="plots", sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(n_complete + n_pruned):
        trial = study.ask()
        lr = trial.suggest_float("train.learning_rate_multiplier", 0.2, 5.0, log=True)
        bs = trial.suggest_categorical("train.batch_size_multiplier", [1, 2, 4])
        for step in range(1, 4):
            trial.report(1.0 / lr + 0.1 * bs + 1.0 / step, step)
            if i >= n_complete and step == 2:
                break
        if i >= n_complete:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, 1.0 / lr + 0.1 * bs)
    return study


def test_plots_are_readable_interactive_and_claim_no_importance_from_few_trials(tmp_path):
    from PIL import Image

    from phitune.sweep.plots import HTML_FILE, MIN_IMPORTANCE_TRIALS, save_plots

    files, skipped = save_plots(_study(3, 2), tmp_path / "few", "full_valid_loss")
    names = {f.name for f in files}
    assert "param_importances.png" not in names
    assert f"at least {MIN_IMPORTANCE_TRIALS} complete trials" in skipped["param_importances"]
    assert {"optimization_history.png", "intermediate_values.png", HTML_FILE} <= names, (names, skipped)
    page = (tmp_path / "few" / HTML_FILE).read_text(encoding="utf-8")
    assert "Plotly.newPlot" in page and '<script src="http' not in page  # plotly.js embedded: no network needed
    assert page.count('class="plotly-graph-div"') == len([n for n in names if n.endswith(".png")])
    assert "needs at least 5 complete trials" in page  # the reason is on the page, not only in a log
    for png in (f for f in files if f.suffix == ".png"):
        assert Image.open(png).size[0] >= 1200, png  # wide enough for axis names and tick labels

    files, skipped = save_plots(_study(MIN_IMPORTANCE_TRIALS, 1), tmp_path / "enough", "full_valid_loss")
    assert "param_importances.png" in {f.name for f in files}, skipped


# -- the browser -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_sweep(tmp_path: Path, stores) -> subprocess.CompletedProcess:
    """Four tiny trials reporting every tenth of an epoch; the median pruner (from the second
    trial on, at any point) prunes one whose loss is worse than the median of the complete trials'."""
    lines = (REPO / "data/support_train.jsonl").read_text(encoding="utf-8-sig").splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:16]) + "\n", encoding="utf-8")
    lines = (REPO / "data/support_valid.jsonl").read_text(encoding="utf-8-sig").splitlines()
    (tmp_path / "valid.jsonl").write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")
    python = REPO / ".venv/bin/python"
    cmd = [str(python if python.exists() else sys.executable), str(REPO / "train.py"), "-m",
           f"hydra.sweeper.storage={stores.optuna_url}", f"tracking.uri={stores.mlflow_url}",
           f"hydra.sweep.dir={tmp_path}/multirun", f"data.train_file={tmp_path}/train.jsonl",
           f"data.validation_file={tmp_path}/valid.jsonl", "hydra.sweeper.n_trials=4",
           "hydra.sweeper.sampler.name=random", "hydra.sweeper.sampler.seed=3",
           "hydra.sweeper.pruner.name=median", "hydra.sweeper.pruner.n_startup_trials=1",
           "hydra.sweeper.pruner.n_warmup_steps=0", "hydra.sweeper.pruner.report_every=0.1",  # of an epoch
           "train.batch_size_multiplier=1",  # 8 of the 16 examples a step: each trial reports after its first
           "train.learning_rate_multiplier=tag(log, interval(0.05, 20.0))",
           "train.epochs=1", "train.max_steps=3", "train.eval_steps=1", "train.progress=false",
           "train.evaluate_at_end=false", "tracking.log_model=false"]
    return run(cmd, timeout=900, cwd=tmp_path)


def _start_ui(uri: str, log: Path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + 180  # seconds: gunicorn/uvicorn start + schema check on a busy machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow ui exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, port
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise AssertionError(f"mlflow ui did not answer on port {port}: {log.read_text()[-2000:]}")


def _stop(proc) -> None:
    proc.terminate()  # by PID: only the server this test started
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_a_finished_sweep_reads_at_a_glance_in_the_mlflow_ui(tmp_path):
    from playwright.sync_api import sync_playwright

    from phitune.tracking.experiment import ui_url

    stores = make_stores(tmp_path)
    res = _tiny_sweep(tmp_path, stores)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    study = load_study(stores, "phitune-default")
    states = [t.state.name for t in study.get_trials()]
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 1, states
    parents, children = runs(stores, "phitune")
    best = [c for c in children if c.data.tags.get("phitune.best") == "true"]
    assert len(best) == 1 and best[0].info.run_id == parents[0].data.tags["phitune.best_run_id"]
    pruned = [c for c in children if c.data.tags["phitune.trial_state"] == "pruned"]
    assert all(" pruned@" in c.info.run_name for c in pruned)
    url_line = next(line for line in res.stdout.splitlines() if "see it:" in line)
    exp_id = parents[0].info.experiment_id
    assert ui_url(exp_id) in url_line

    proc, port = _start_ui(stores.mlflow_url, tmp_path / "mlflow-ui.log")
    shot = tmp_path / "mlflow-sweep.png"
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--no-first-run"],
                viewport={"width": 1920, "height": 800})  # the assistant panel takes ~360 px
            page = ctx.new_page()
            try:
                _look(page, ui_url(exp_id, base=f"http://127.0.0.1:{port}"), parents[0], children, shot)
            except Exception:
                page.screenshot(path=str(tmp_path / "failure.png"))  # what the browser showed
                (tmp_path / "failure.html").write_text(page.content(), encoding="utf-8")
                raise
            finally:
                ctx.close()
    finally:
        _stop(proc)
    assert shot.stat().st_size > 20_000
    docs = REPO / "docs/img/mlflow-sweep.png"
    if os.environ.get("PHITUNE_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
        docs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, docs)


def _look(page, url: str, parent, children, shot: Path) -> None:
    """What a user sees on the link phitune prints, then the screenshot."""
    page.goto(url)
    # The experiment's training runs (not MLflow 3's GenAI traces view); the parent's row
    # states the sweep's result even while its trials are folded under it.
    assert "best trial-" in parent.info.run_name
    page.get_by_text(parent.info.run_name, exact=True).first.wait_for(timeout=90_000)
    _expand(page, parent.info.run_name)
    for child in children:
        page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
    assert page.get_by_text("★ best", exact=False).count() >= 1  # the best trial is marked
    assert page.get_by_text(" pruned@", exact=False).count() >= 1  # a pruned trial says so
    page.wait_for_timeout(1500)  # milliseconds: let the table settle before the picture
    page.screenshot(path=str(shot))


def _expand(page, parent_name: str) -> None:
    """Open the parent's row (MLflow shows a sweep's trials under it, collapsed at first)."""
    row = page.locator("[role='row']", has_text=parent_name).first
    button = row.locator("button").first
    if button.count():
        button.click()

