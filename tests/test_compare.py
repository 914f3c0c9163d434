"""`phitune compare` on a tracking store with known runs, created directly with MlflowClient."""
from __future__ import annotations

import csv
import io
import json

import pytest
from mlflow.tracking import MlflowClient

from phitune.cli import main

SPACE = {"space.train.learning_rate_multiplier": "tag(log, interval(0.2, 5.0))",
         "space.train.batch_size_multiplier": "choice(1, 2)"}


def _run(client, exp_id, *, params=None, metrics=None, tags=None, status="FINISHED", name=None):
    run = client.create_run(exp_id, run_name=name, tags=tags or {})
    rid = run.info.run_id
    for k, v in (params or {}).items():
        client.log_param(rid, k, v)
    for k, v in (metrics or {}).items():
        client.log_metric(rid, k, v)
    client.set_terminated(rid, status)
    return rid


def _trial(client, exp_id, parent, number, state, lr, bs, metrics, status="FINISHED"):
    params = {"train.learning_rate_multiplier": lr, "train.batch_size_multiplier": bs, "train.epochs": 1,
              "model.name": "tiny-phi3", "derived.output_dir": f"/ckpt/{number}"}
    tags = {"mlflow.parentRunId": parent, "phitune.trial_number": str(number), "phitune.trial_state": state}
    return _run(client, exp_id, params=params, metrics=metrics, tags=tags, status=status, name=f"trial-{number}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """experiment `exp`: one sweep (5 trials) + a single run, a killed run, an eval run."""
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("exp")
    parent = _run(client, exp, params={**SPACE, "n_trials": 5}, tags={"phitune.role": "sweep", "phitune.study": "s1"},
                  name="sweep-s1")
    t = {
        0: _trial(client, exp, parent, 0, "complete", 1.0, 1, {"full_valid_loss": 2.5, "full_valid_mean_token_accuracy": 0.30}),
        1: _trial(client, exp, parent, 1, "complete", 0.5, 2, {"full_valid_loss": 1.5, "full_valid_mean_token_accuracy": 0.40}),
        # pruned with the lowest loss of all: still listed after every finished trial, and never ranked
        2: _trial(client, exp, parent, 2, "pruned", 4.0, 1, {"full_valid_loss": 0.5}),
        3: _trial(client, exp, parent, 3, "failed", 0.3, 2, {}, status="FAILED"),
        4: _trial(client, exp, parent, 4, "complete", 2.0, 2, {"full_valid_loss": 2.0, "full_valid_mean_token_accuracy": 0.45}),
    }
    single = _run(client, exp, params={"train.learning_rate_multiplier": 1.0, "train.batch_size_multiplier": 1,
                                       "train.epochs": 3, "model.name": "tiny-phi3"},
                  metrics={"full_valid_loss": 1.0, "full_valid_mean_token_accuracy": 0.5, "perplexity": 2.718,
                           "train_runtime_s": 12.0}, name="single")
    killed = _run(client, exp, params={"train.learning_rate_multiplier": 1.0, "train.batch_size_multiplier": 1,
                                       "train.epochs": 3, "model.name": "tiny-phi3"}, status="KILLED", name="killed")
    evaluation = _run(client, exp, metrics={"eval_loss": 0.1}, tags={"phitune.role": "eval", "phitune.eval_of": single},
                      name="eval")
    return {"uri": uri, "parent": parent, "trials": t, "single": single, "killed": killed, "eval": evaluation}


def _compare(capsys, store, *args):
    rc = main(["compare", "--tracking-uri", store["uri"], *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_sweep_leaderboard_ranks_finished_trials_then_pruned_and_failed(store, capsys):
    rc, out, _ = _compare(capsys, store, "--sweep", store["parent"], "--format", "json")
    assert rc == 0
    data = json.loads(out)
    rows = data["rows"]
    assert [r["trial"] for r in rows] == [1, 4, 0, 2, 3]  # 1.5 < 2.0 < 2.5, then pruned, failed
    assert [r["state"] for r in rows] == ["finished", "finished", "finished", "pruned", "failed"]
    assert [r["rank"] for r in rows] == [1, 2, 3, None, None]
    assert [r["run_id"] for r in rows] == [store["trials"][i] for i in (1, 4, 0, 2, 3)]
    # the sweep's search space, as its parent run lists it (space.*), is what is shown
    assert set(rows[0]["params"]) == {"train.learning_rate_multiplier", "train.batch_size_multiplier"}
    assert rows[0]["params"]["train.learning_rate_multiplier"] == "0.5"
    assert rows[0]["metrics"]["full_valid_loss"] == 1.5
    assert data["metric"] == "full_valid_loss" and data["direction"] == "min" and data["study"] == "s1"


def test_accuracy_is_higher_is_better_and_direction_overrides(store, capsys):
    _, out, _ = _compare(capsys, store, "--sweep", store["parent"], "--metric", "full_valid_mean_token_accuracy",
                         "--format", "json")
    rows = json.loads(out)["rows"]
    # 0.45 > 0.40 > 0.30; the pruned trial has no accuracy, the failed one nothing
    assert [r["trial"] for r in rows] == [4, 1, 0, 2, 3]
    _, out, _ = _compare(capsys, store, "--sweep", store["parent"], "--direction", "max", "--format", "json")
    assert [r["trial"] for r in json.loads(out)["rows"]] == [0, 4, 1, 2, 3]


def test_experiment_leaderboard_leaves_out_sweep_parents_and_eval_runs(store, capsys):
    rc, out, _ = _compare(capsys, store, "--experiment", "exp", "--format", "json")
    rows = json.loads(out)["rows"]
    ids = [r["run_id"] for r in rows]
    assert store["parent"] not in ids and store["eval"] not in ids
    # the single run (1.0) beats every trial; finished, then pruned, killed, failed
    assert ids[:4] == [store["single"], store["trials"][1], store["trials"][4], store["trials"][0]]
    assert [r["state"] for r in rows[4:]] == ["pruned", "killed", "failed"]
    assert rows[5]["run_id"] == store["killed"]
    # params that vary across the runs shown; constant ones (model.name) and derived.* are left out
    assert set(rows[0]["params"]) == {"train.learning_rate_multiplier", "train.batch_size_multiplier", "train.epochs"}
    assert rows[0]["metrics"]["perplexity"] == pytest.approx(2.718)


def test_table_and_top(store, capsys):
    rc, out, _ = _compare(capsys, store, "--sweep", store["parent"], "--top", "2")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"sweep {store['parent']} (study s1): 5 runs, ranked by full_valid_loss (lower is better)")
    header = lines[1].split()
    assert header[:5] == ["rank", "run", "name", "trial", "state"] and "learning_rate_multiplier" in header
    assert lines[2].split()[:5] == ["1", store["trials"][1][:8], "trial-1", "1", "finished"]
    assert lines[3].split()[:2] == ["2", store["trials"][4][:8]]
    assert lines[4] == "... 3 more run(s) not shown (--top)"


def test_csv(store, capsys):
    rc, out, _ = _compare(capsys, store, "--sweep", store["parent"], "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0])[:5] == ["rank", "run_id", "run_name", "trial", "state"]
    assert [(r["rank"], r["trial"], r["state"]) for r in rows] == [
        ("1", "1", "finished"), ("2", "4", "finished"), ("3", "0", "finished"), ("", "2", "pruned"), ("", "3", "failed")]
    assert float(rows[0]["full_valid_loss"]) == 1.5 and rows[4]["full_valid_loss"] == ""
    assert rows[0]["train.batch_size_multiplier"] == "2"


def test_sweep_latest_and_errors(store, capsys):
    rc, out, _ = _compare(capsys, store, "--experiment", "exp", "--sweep", "latest", "--format", "json")
    assert rc == 0 and json.loads(out)["sweep"] == store["parent"]
    rc, _, err = _compare(capsys, store, "--experiment", "nope")
    assert rc == 1 and "no experiment 'nope'" in err and "exp" in err
    rc, _, err = _compare(capsys, store, "--experiment", "exp", "--metric", "train_runtime_s")
    assert rc == 1 and "--direction" in err  # a metric that exists, with no known direction
    rc, _, err = _compare(capsys, store, "--sweep", "0123456789abcdef")
    assert rc == 1 and "no such run" in err


def test_bad_options_say_what_there_is(store, capsys):
    """A typo'd metric lists the metrics the runs have (not a column of dashes); a run that is not a
    sweep, a negative --top and a store MLflow cannot open are one-line errors, exit != 0."""
    for metric in ("ful_valid_loss", "tokens_per_second"):  # with and without a known direction
        rc, out, err = _compare(capsys, store, "--experiment", "exp", "--metric", metric)
        assert rc == 1 and not out and f"--metric {metric}: none of these 7 run(s) has it" in err
        assert "full_valid_loss, full_valid_mean_token_accuracy, perplexity, train_runtime_s" in err
    rc, _, err = _compare(capsys, store, "--sweep", store["parent"], "--metric", "perplexity")
    assert rc == 1 and "none of these 5 run(s)" in err  # only the single run has it, not the trials
    rc, _, err = _compare(capsys, store, "--sweep", store["single"])
    assert rc == 1 and "not a sweep's parent run" in err
    with pytest.raises(SystemExit) as exit_:
        _compare(capsys, store, "--top", "-1")
    assert exit_.value.code == 2 and "expected a number of rows" in capsys.readouterr().err
    rc = main(["compare", "--tracking-uri", "nosuchscheme://x"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("phitune compare: tracking store nosuchscheme://x:") and "Traceback" not in err


def test_missing_store_is_a_message_not_a_new_database(tmp_path, capsys):
    rc = main(["compare", "--tracking-uri", f"sqlite:///{tmp_path}/none/mlflow.db"])
    assert rc == 1 and "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
