"""`phitune sweep dashboard`: optuna-dashboard on a sweep's study, trials linked to MLflow runs.

A real Optuna study in sqlite whose trial got its MLflow run id through TrialReporter (as a
sweep's job does), a parent run naming the study and storage, and the real dashboard server
in a subprocess, asked over HTTP.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from mlflow.tracking import MlflowClient

from phitune.cli import main
from phitune.sweep.study import MLFLOW_RUN_ATTR
from phitune.sweep.trial_hook import TrialReporter


@pytest.fixture
def sweep(tmp_path):
    url = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="s1", storage=url)
    trial = study.ask()
    reporter = TrialReporter.from_config({"storage": url, "study_name": "s1", "number": trial.number})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("phitune")
    child = client.create_run(exp).info.run_id
    reporter.link_run(child)  # what recipe does once the trial's MLflow run exists
    study.tell(trial, 1.25)
    parent = client.create_run(exp, tags={"phitune.role": "sweep", "phitune.study": "s1"}).info.run_id
    client.log_param(parent, "study_name", "s1")
    client.log_param(parent, "storage", url)
    return {"uri": uri, "url": url, "parent": parent, "child": child, "client": client, "exp": exp}


def test_a_trial_carries_its_mlflow_run_id(sweep):
    (trial,) = optuna.load_study(study_name="s1", storage=sweep["url"]).trials
    assert trial.user_attrs[MLFLOW_RUN_ATTR] == sweep["child"]


def test_dashboard_serves_the_study_on_localhost_and_prints_where(sweep, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen([sys.executable, "-c", "from phitune.cli import main; raise SystemExit(main())",
                             "sweep", "dashboard", "--tracking-uri", sweep["uri"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # --sweep latest: the only sweep
        assert lines[0].startswith("optuna-dashboard for study s1"), (lines, proc.stderr.read() if proc.poll() else "")
        url = lines[1].strip()
        assert url.startswith("http://127.0.0.1:") and "/dashboard/studies/" in url
        assert f"#/experiments/{sweep['exp']}/runs/{sweep['parent']}" in lines[2]
        api = url.replace("/dashboard/studies/", "/api/studies/") + "?after=0"
        deadline = time.time() + 60
        while True:
            try:
                body = urllib.request.urlopen(api, timeout=5).read().decode()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "the dashboard did not come up"
                time.sleep(0.3)
        assert MLFLOW_RUN_ATTR in body and sweep["child"] in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_input_is_a_message(sweep, tmp_path, capsys):
    client = sweep["client"]

    def parent(study, storage):
        rid = client.create_run(sweep["exp"], tags={"phitune.role": "sweep"}).info.run_id
        client.log_param(rid, "study_name", study)
        client.log_param(rid, "storage", storage)
        return rid

    for rid, why in ((parent("s1", "postgresql://phitune:***@db/optuna"), "masked password (postgresql://phitune:***@db/optuna); pass --storage URL"),
                     (parent("s1", f"sqlite:///{tmp_path}/moved.db"), "no study database at"),
                     (parent("zz", sweep["url"]), "no study 'zz' in"),
                     (sweep["child"], "not a sweep's parent run")):
        rc = main(["sweep", "dashboard", "--sweep", rid, "--tracking-uri", sweep["uri"]])
        err = capsys.readouterr().err
        assert rc == 1 and why in err and "Traceback" not in err, err
