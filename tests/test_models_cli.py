"""`phitune models list | show | delete`: aliases, deployments, and the delete guard."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import mlflow
import pytest
from mlflow.entities import LoggedModelOutput
from mlflow.tracking import MlflowClient

from phitune import deployments
from phitune.cli import main


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One tracking store for the module (creating one takes seconds); records beside it."""
    mp = pytest.MonkeyPatch()
    mp.delenv("PHITUNE_DEPLOYMENTS_DIR", raising=False)  # deployment records beside the db
    tmp = tmp_path_factory.mktemp("models")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    yield {"uri": uri, "client": client, "exp": client.create_experiment("phitune")}
    mp.undo()


_names = itertools.count()


@pytest.fixture
def registry(db):
    """Model `bot<n>` with versions 1 (@champion) and 2 (@challenger); model `other<n>` with version 1."""
    client, exp, uri = db["client"], db["exp"], db["uri"]
    mlflow.set_tracking_uri(uri)  # MLflow's registry resolves models:/<id> sources through the global URI
    n = next(_names)
    bot, other = f"bot{n}", f"other{n}"

    def version(name, digest, loss):
        run = client.create_run(exp).info.run_id
        model = client.create_logged_model(exp, name="model", source_run_id=run)
        client.log_outputs(run, [LoggedModelOutput(model.model_id, step=0)])
        client.set_terminated(run)
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name)
        return client.create_model_version(name, f"models:/{model.model_id}", run_id=run, model_id=model.model_id,
                                           tags={"phitune.metric": "full_valid_loss", "metric.full_valid_loss": str(loss),
                                                 "phitune.valid_digest": digest, "phitune.checkpoint": "final"})

    v1, v2 = version(bot, "d" * 64, 1.25), version(bot, "d" * 64, 1.5)
    version(other, "e" * 64, 2.0)
    client.set_registered_model_alias(bot, "champion", v1.version)
    client.set_registered_model_alias(bot, "challenger", v2.version)
    return {**db, "bot": bot, "other": other}


@pytest.fixture
def server():
    """A live process standing in for `phitune serve`: its pid and start time, as serve records them."""
    from phitune.serving.server import process_start_time

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield {"pid": proc.pid, "pid_started": process_start_time(proc.pid), "proc": proc}
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def models(capsys, registry, *args):
    rc = main(["models", *args, "--tracking-uri", registry["uri"]])
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_shows_versions_aliases_and_deployments(registry, server, capsys):
    bot, other = registry["bot"], registry["other"]
    dep = deployments.record_deployment(f"models:/{bot}@champion", bot, "1", "local", "http://127.0.0.1:8080",
                                        tracking_uri=registry["uri"], pid=server["pid"],
                                        pid_started=server["pid_started"])
    rc, out, _ = models(capsys, registry, "list")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["name", "versions", "latest", "aliases", "deployments"]
    row = next(line for line in lines if line.startswith(f"{bot} "))
    assert "@challenger=2 @champion=1" in row and f"v1: {dep['id']} http://127.0.0.1:8080" in row
    assert next(line for line in lines if line.startswith(f"{other} ")).split()[1:4] == ["1", "1", "-"]

    rc = main(["models", "--tracking-uri", registry["uri"], "list", "--format", "json"])  # the option before, too
    out = capsys.readouterr().out
    data = {m["name"]: m for m in json.loads(out)}
    assert data[bot]["aliases"] == {"challenger": "2", "champion": "1"} and data[bot]["versions"] == 2
    assert [d["id"] for d in data[bot]["deployments"]] == [dep["id"]] and data[other]["deployments"] == []


def test_show_lists_each_version(registry, server, capsys):
    bot = registry["bot"]
    dep = deployments.record_deployment(f"models:/{bot}/2", bot, "2", "local", "http://127.0.0.1:9000",
                                        tracking_uri=registry["uri"], pid=server["pid"], pid_started=server["pid_started"])
    rc, out, _ = models(capsys, registry, "show", bot)
    assert rc == 0
    assert out.splitlines()[0] == f"{bot}: 2 version(s); aliases @challenger=2 @champion=1"
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.split()[0].isdigit()}
    assert "@champion" in rows["1"] and "full_valid_loss 1.25" in rows["1"] and "d" * 12 in rows["1"]
    assert "@challenger" in rows["2"] and dep["id"] in rows["2"] and "http://127.0.0.1:9000" in rows["2"]
    rc, out, _ = models(capsys, registry, "show", bot, "--format", "json")
    versions = json.loads(out)["versions"]
    assert [v["version"] for v in versions] == ["1", "2"] and versions[1]["deployments"][0]["id"] == dep["id"]
    rc, _, err = models(capsys, registry, "show", "nope")
    assert rc == 1 and "no registered model 'nope'" in err and bot in err


def test_delete_is_refused_while_deployed_and_allowed_after(registry, server, capsys):
    client, uri, bot = registry["client"], registry["uri"], registry["bot"]
    dep = deployments.record_deployment(f"models:/{bot}@champion", bot, "1", "local", "http://127.0.0.1:8080",
                                        tracking_uri=uri, pid=server["pid"], pid_started=server["pid_started"])
    rc, _, err = models(capsys, registry, "delete", f"{bot}/1")
    assert rc == 1
    assert (f"model {bot} version 1 is deployed (deployment {dep['id']} at http://127.0.0.1:8080); "
            f"delete the deployment first: phitune undeploy {dep['id']}") in err
    rc, _, err = models(capsys, registry, "delete", bot)  # the whole model: also refused
    assert rc == 1 and f"model {bot} is deployed (version 1: deployment {dep['id']}" in err
    assert str(client.get_model_version(bot, "1").version) == "1"  # still there

    # a version nobody serves can go; its alias goes with it
    rc, out, _ = models(capsys, registry, "delete", f"{bot}/2")
    assert rc == 0 and f"deleted model {bot} version 2 (its alias @challenger went with it)" in out

    deployments.mark_deleted(dep["id"], tracking_uri=uri)  # what `phitune undeploy` records
    rc, out, _ = models(capsys, registry, "delete", f"{bot}/1")
    assert rc == 0 and f"deleted model {bot} version 1" in out
    rc, out, _ = models(capsys, registry, "delete", bot)
    assert rc == 0 and f"deleted model {bot} (0 versions)" in out
    names = {m.name for m in client.search_registered_models()}
    assert bot not in names and registry["other"] in names


def test_delete_is_allowed_once_the_local_server_died(registry, server, capsys):
    uri, bot = registry["uri"], registry["bot"]
    deployments.record_deployment(f"models:/{bot}/1", bot, "1", "local", "http://127.0.0.1:8080", tracking_uri=uri,
                                  pid=server["pid"], pid_started=server["pid_started"])
    rc, _, err = models(capsys, registry, "delete", f"{bot}/1")
    assert rc == 1 and "is deployed" in err  # while it serves
    server["proc"].kill()  # the server dies without `phitune undeploy`
    server["proc"].wait(10)
    rc, out, err = models(capsys, registry, "delete", f"{bot}/1")
    assert rc == 0 and f"deleted model {bot} version 1" in out, err


def test_delete_errors(registry, capsys):
    bot = registry["bot"]
    rc, _, err = models(capsys, registry, "delete", f"{bot}/7")
    assert rc == 1 and f"model {bot} has no version 7" in err
    rc, _, err = models(capsys, registry, "delete", "ghost")
    assert rc == 1 and "no registered model 'ghost'" in err
    rc, _, err = models(capsys, registry, "delete", f"{bot}/latest")
    assert rc == 1 and "NAME/VERSION" in err
