"""`phitune promote`: the registry gate, epoch checkpoints as candidates, sweeps.

The gate tests use runs made with MlflowClient that carry a (cheap, artifact-less)
logged model, chosen tags and metrics; the checkpoint test uses the real tiny run
that test_eval trains once per session.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.entities import LoggedModelOutput
from mlflow.tracking import MlflowClient

from phitune.cli import main
from test_eval import real_run

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    return real_run(tmp_path_factory)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('promote')}/mlflow.db"
    return {"uri": uri, "client": MlflowClient(uri, registry_uri=uri)}


@pytest.fixture
def store(db, request):
    """Its own experiment per test (one database per module: creating one takes seconds)."""
    name = request.node.name
    return {**db, "exp": db["client"].create_experiment(name), "experiment": name}


def fake_run(store, *, digest=DIGEST_A, metrics=None, tags=None, status="FINISHED", params=None):
    """A finished training run as promote sees it: tags, metrics, params and a logged model named `model`."""
    client = store["client"]
    run = client.create_run(store["exp"], tags={"phitune.valid_digest": digest, "phitune.config_hash": "c0ffee",
                                                **(tags or {})})
    rid = run.info.run_id
    model = client.create_logged_model(store["exp"], name="model", source_run_id=rid)
    client.log_outputs(rid, [LoggedModelOutput(model.model_id, step=0)])
    for k, v in (params or {"train.learning_rate_multiplier": "1.0"}).items():
        client.log_param(rid, k, v)
    for k, v in (metrics or {}).items():
        client.log_metric(rid, k, v)
    client.set_terminated(rid, status)
    return rid


def promote(capsys, store, *args):
    rc = main(["promote", "--tracking-uri", store["uri"], *args])
    out, err = capsys.readouterr()
    return rc, out, err


def aliases(store, name):
    return {alias: str(version) for alias, version in store["client"].get_registered_model(name).aliases.items()}


def test_gate_better_takes_champion_worse_gets_challenger(store, capsys):
    client = store["client"]
    first = fake_run(store, metrics={"full_valid_loss": 2.0, "full_valid_mean_token_accuracy": 0.3},
                     tags={"phitune.model": "tiny-phi3"},
                     params={"data.name": "support", "train.learning_rate_multiplier": "1.0",
                             "train.batch_size_multiplier": "2", "derived.epochs": "3"})
    rc, out, _ = promote(capsys, store, "--run", first, "--name", "bot")
    assert rc == 0 and "gate: no @champion yet" in out and "@champion -> bot version 1" in out
    assert aliases(store, "bot") == {"champion": "1"}
    v1 = client.get_model_version("bot", "1")
    assert v1.run_id == first and v1.tags["phitune.run_id"] == first
    assert v1.tags["phitune.valid_digest"] == DIGEST_A and v1.tags["phitune.model"] == "tiny-phi3"
    assert float(v1.tags["metric.full_valid_loss"]) == 2.0 and v1.tags["phitune.checkpoint"] == "final"
    # a registry table's worth of tags; the config hash, params and other metrics stay on the run
    assert set(v1.tags) == {"phitune.run_id", "phitune.checkpoint", "phitune.metric", "metric.full_valid_loss",
                            "phitune.valid_digest", "phitune.model", "phitune.gate"}
    assert v1.description == (f"tiny-phi3 fine-tuned (LoRA) on support (learning rate x 1.0, batch size x 2, "
                              f"epochs 3): full_valid_loss 2 on validation data {DIGEST_A[:12]}, the final model "
                              f"of run {first[:12]}; serve it with phitune serve models:/bot/1")
    assert v1.source.startswith("models:/m-")

    worse = fake_run(store, metrics={"full_valid_loss": 2.5})
    rc, out, _ = promote(capsys, store, "--run", worse, "--name", "bot")
    assert rc == 0
    assert "does not beat 2 of @champion (version 1) on the same validation data" in out
    assert "@challenger -> bot version 2; @champion stays on version 1" in out
    assert aliases(store, "bot") == {"champion": "1", "challenger": "2"}

    better = fake_run(store, metrics={"full_valid_loss": 1.5})
    rc, out, _ = promote(capsys, store, "--run", better, "--name", "bot")
    assert rc == 0 and "full_valid_loss 1.5 beats 2 of version 1" in out
    assert "@champion -> bot version 3 (was version 1)" in out
    assert aliases(store, "bot") == {"champion": "3", "challenger": "2"}

    # a tie is not a win
    tie = fake_run(store, metrics={"full_valid_loss": 1.5})
    rc, out, _ = promote(capsys, store, "--run", tie, "--name", "bot")
    assert rc == 0 and aliases(store, "bot") == {"champion": "3", "challenger": "4"}

    # promoting the champion's own run again registers nothing
    rc, out, _ = promote(capsys, store, "--run", better, "--name", "bot")
    assert rc == 0 and "already @champion; nothing to do" in out
    assert len(client.search_model_versions("name = 'bot'")) == 4


def test_other_validation_data_is_refused_unless_forced(store, capsys):
    client = store["client"]
    champion = fake_run(store, digest=DIGEST_A, metrics={"full_valid_loss": 2.0})
    assert promote(capsys, store, "--run", champion, "--name", "data")[0] == 0
    other = fake_run(store, digest=DIGEST_B, metrics={"full_valid_loss": 0.5})  # "better", but on other data
    rc, out, _ = promote(capsys, store, "--run", other, "--name", "data")
    assert rc == 1
    assert "refused: the validation data differ" in out
    assert f"data digest {DIGEST_A[:12]}, this run on {DIGEST_B[:12]}" in out and "--force" in out
    assert len(client.search_model_versions("name = 'data'")) == 1  # nothing registered
    assert aliases(store, "data") == {"champion": "1"}

    rc, out, _ = promote(capsys, store, "--run", other, "--name", "data", "--force")
    assert rc == 0 and "forced (--force): the validation data differ" in out
    assert aliases(store, "data") == {"champion": "2"}
    assert client.get_model_version("data", "2").tags["phitune.gate"] == "forced"


def test_higher_is_better_for_accuracy(store, capsys):
    a = fake_run(store, metrics={"full_valid_loss": 1.0, "full_valid_mean_token_accuracy": 0.40})
    b = fake_run(store, metrics={"full_valid_loss": 2.0, "full_valid_mean_token_accuracy": 0.45})
    metric = ("--metric", "full_valid_mean_token_accuracy")
    assert promote(capsys, store, "--run", a, "--name", "acc", *metric)[0] == 0
    rc, out, _ = promote(capsys, store, "--run", b, "--name", "acc", *metric)
    assert rc == 0 and "0.45 beats 0.4" in out and aliases(store, "acc") == {"champion": "2"}
    # the experiment's best by loss is run a; by accuracy it is b
    rc, out, _ = promote(capsys, store, "--experiment", store["experiment"], "--name", "loss")
    assert f"run {a}, final model" in out
    # the champion (b) was promoted by accuracy: its loss, not a version tag, comes from its run
    rc, out, _ = promote(capsys, store, "--run", a, "--name", "acc")
    assert rc == 0 and "full_valid_loss 1 beats 2 of version 2" in out and "@champion -> acc version 1" in out


def test_a_sweep_promotes_its_best_finished_trial_never_a_pruned_one(store, capsys):
    client = store["client"]
    parent = client.create_run(store["exp"], tags={"phitune.role": "sweep"}).info.run_id
    kids = {}
    for n, state, loss, status in ((0, "complete", 2.0, "FINISHED"), (1, "pruned", 0.1, "FINISHED"),
                                   (2, "failed", None, "FAILED"), (3, "complete", 1.2, "FINISHED")):
        kids[n] = fake_run(store, status=status, metrics={} if loss is None else {"full_valid_loss": loss},
                           tags={"mlflow.parentRunId": parent, "phitune.trial_number": str(n),
                                 "phitune.trial_state": state})
    rc, out, _ = promote(capsys, store, "--sweep", parent, "--name", "swept")  # parent's experiment
    assert rc == 0 and "best of 2 candidate(s)" in out and f"run {kids[3]} (trial 3)" in out
    v = client.get_model_version("swept", "1")
    assert v.run_id == kids[3] and v.tags["phitune.sweep"] == parent and v.tags["phitune.trial_number"] == "3"

    # --checkpoint best: trials that kept no epoch checkpoint (train.max_steps mid-epoch) still
    # offer their final model; the same trial wins, and its version is reused
    rc, out, _ = promote(capsys, store, "--sweep", parent, "--name", "swept", "--checkpoint", "best")
    assert rc == 0 and f"run {kids[3]} (trial 3), final model" in out and "already @champion" in out

    rc, _, err = promote(capsys, store, "--run", kids[1], "--name", "swept")
    assert rc == 1 and "is pruned, not finished" in err
    rc, _, err = promote(capsys, store, "--sweep", parent, "--name", "swept", "--metric", "eval_bleu")
    assert rc == 1 and "--metric eval_bleu: none of these 4 run(s) has it; the metrics they have: full_valid_loss" in err
    rc, _, err = promote(capsys, store, "--sweep", kids[0], "--name", "swept")
    assert rc == 1 and "not a sweep's parent run" in err


def test_bad_alias_or_store_is_refused_before_anything_is_registered(store, capsys):
    """MLflow checks an alias only when it is set, after the version exists: phitune checks first."""
    client = store["client"]
    rid = fake_run(store, metrics={"full_valid_loss": 1.0})
    for alias, why in (("bad alias!", "Names may only contain"), ("latest", "reserved"), ("v3", "reserved")):
        rc, out, err = promote(capsys, store, "--run", rid, "--name", "aliased", "--alias", alias)
        assert rc == 1 and f"--alias {alias}: " in err and why in err and "Traceback" not in err
    assert client.search_registered_models("name = 'aliased'") == []
    rc = main(["promote", "--tracking-uri", "nosuchscheme://x", "--run", rid, "--name", "aliased"])
    assert rc == 1 and "phitune promote: tracking store nosuchscheme://x:" in capsys.readouterr().err


def test_epoch_checkpoints_are_candidates(real, capsys, tmp_path):
    """Real run: epoch 1 is logged as a chat model and registered; the final (epoch 2) beats it."""
    store = {"uri": real["uri"]}
    client = MlflowClient(real["uri"], registry_uri=real["uri"])
    rid = real["run_id"]
    run_dir = real["tmp"] / "ckpt"
    e1 = json.loads((run_dir / "epoch-001" / "state.json").read_text())["epoch_metrics"][0]["full_valid_loss"]
    final = client.get_run(rid).data.metrics["full_valid_loss"]
    assert final < e1  # 2 epochs of training lower the validation loss: the premise of this test

    rc, out, _ = promote(capsys, store, "--run", rid, "--name", "ckpt", "--checkpoint", "1")
    assert rc == 0 and f"run {rid}, epoch-001" in out and "@champion -> ckpt version 1" in out
    v1 = client.get_model_version("ckpt", "1")
    assert v1.tags["phitune.checkpoint"] == "epoch-001" and "epoch 1 of run" in v1.description
    assert float(v1.tags["metric.full_valid_loss"]) == pytest.approx(e1)
    # the checkpoint's model was logged into the source run, which stays FINISHED
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    names = {client.get_logged_model(o.model_id).name: o.model_id for o in run.outputs.model_outputs}
    assert set(names) == {"model", "checkpoint-epoch-001", "checkpoint-epoch-002"}
    # the files went into epoch 1's LoggedModel from training (no second one of that name)
    assert v1.source == f"models:/{names['checkpoint-epoch-001']}" and len(run.outputs.model_outputs) == 3
    from phitune.models.uri import resolve

    src = resolve("models:/ckpt@champion", real["uri"], tmp_path / "m")
    assert src.base_ref["name"] == "tiny-phi3" and src.checkpoint == "epoch-001" and src.run_id == rid
    assert resolve(f"models:/{names['checkpoint-epoch-001']}", real["uri"], tmp_path / "l").run_id == rid
    assert (Path(src.adapter_dir) / "adapter_model.safetensors").is_file()

    # best: epoch 2 is the run's final model (same step), and it beats version 1
    rc, out, _ = promote(capsys, store, "--run", rid, "--name", "ckpt", "--checkpoint", "best")
    assert rc == 0 and "best of 2 candidate(s)" in out and f"run {rid}, final model" in out
    assert "@champion -> ckpt version 2 (was version 1)" in out
    final_model = next(o.model_id for o in run.outputs.model_outputs if client.get_logged_model(o.model_id).name == "model")
    assert client.get_model_version("ckpt", "2").source == f"models:/{final_model}"
    # epoch 1 again: its version is reused, and it loses to the champion
    rc, out, _ = promote(capsys, store, "--run", rid, "--name", "ckpt", "--checkpoint", "1")
    assert rc == 0 and "version 1 already holds" in out and "@challenger -> ckpt version 1" in out
    assert aliases({"client": client}, "ckpt") == {"champion": "2", "challenger": "1"}
    assert len(client.search_model_versions("name = 'ckpt'")) == 2
