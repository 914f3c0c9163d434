"""task=classification through compare, promote and the backends: the task's metric
(full_valid_macro_f1, higher is better) by default, Foundry refusing the task."""
from __future__ import annotations

import pytest

from phitune.backends import lookup
from phitune.errors import PhituneError
from test_promote import aliases, fake_run, promote  # noqa: F401  (fixtures below)
from test_promote import db, store  # noqa: F401

CLS = {"phitune.task": "classification"}


def test_promote_gates_on_macro_f1(store, capsys):  # noqa: F811
    # the loss disagrees with macro-F1 on purpose: a lower loss must not win the gate
    first = fake_run(store, tags=CLS, metrics={"full_valid_macro_f1": 0.5, "full_valid_loss": 1.0})
    worse = fake_run(store, tags=CLS, metrics={"full_valid_macro_f1": 0.4, "full_valid_loss": 0.5})
    better = fake_run(store, tags=CLS, metrics={"full_valid_macro_f1": 0.7, "full_valid_loss": 2.0})
    rc, out, _ = promote(capsys, store, "--run", first, "--name", "intents")
    assert rc == 0 and aliases(store, "intents") == {"champion": "1"}
    assert "by full_valid_macro_f1 (higher is better)" in out
    rc, out, _ = promote(capsys, store, "--run", worse, "--name", "intents")
    assert rc == 0 and aliases(store, "intents") == {"champion": "1", "challenger": "2"}
    assert "full_valid_macro_f1 0.4 does not beat 0.5" in out
    rc, out, _ = promote(capsys, store, "--run", better, "--name", "intents")
    assert rc == 0 and aliases(store, "intents") == {"champion": "3", "challenger": "2"}
    assert store["client"].get_model_version("intents", "3").tags["metric.full_valid_macro_f1"] == "0.7"


def test_compare_ranks_classifiers_by_macro_f1_and_asks_when_tasks_mix(store, capsys):  # noqa: F811
    from phitune.cli import main

    low = fake_run(store, tags=CLS, metrics={"full_valid_macro_f1": 0.2, "full_valid_loss": 0.1})
    high = fake_run(store, tags=CLS, metrics={"full_valid_macro_f1": 0.9, "full_valid_loss": 3.0})
    args = ["compare", "--tracking-uri", store["uri"], "--experiment", store["experiment"], "--format", "csv"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert "full_valid_macro_f1" in out[0] and out[1].startswith(f"1,{high}") and out[2].startswith(f"2,{low}")
    fake_run(store, metrics={"full_valid_loss": 1.0})  # a chat run in the same experiment
    assert main(args) == 1
    assert "several tasks (chat, classification)" in capsys.readouterr().err
    assert main(args + ["--metric", "full_valid_loss"]) == 0


def test_foundry_refuses_classification_before_anything_is_sent():
    assert lookup("foundry", "run", "chat").name == "foundry"
    with pytest.raises(PhituneError, match="backend=foundry cannot train task=classification.*backend=azureml"):
        lookup("foundry", "run", "classification")
    assert lookup("azureml", "sweep", "classification").name == "azureml"
    assert lookup("local", "trial", "classification").name == "local"


def test_train_py_with_foundry_and_classification_exits_1_without_traceback(repo_root, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "train.py", "task=classification", "backend=foundry",
                          f"hydra.run.dir={tmp_path}/h"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "backend=foundry cannot train task=classification" in out.stderr


def test_azureml_command_job_carries_the_task_and_validates_labelled_data(repo_root, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(repo_root / "train.py"), "task=classification", "backend=azureml",
                          "backend.dry_run=true", f"data.train_file={repo_root}/data/tickets_train.jsonl",
                          "data.validation=auto", f"hydra.run.dir={tmp_path}/h"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    job = (tmp_path / "outputs/azure/job.yaml").read_text()
    assert "python train.py task=classification" in job
