"""`phitune deployments` / `phitune undeploy` on hand-made records: no model, no server.

(A real `phitune serve` process, its record and its undeploy: tests/test_serve.py.)"""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from phitune import deployments
from phitune.cli import main


@pytest.fixture
def records(tmp_path, monkeypatch):
    monkeypatch.setenv("PHITUNE_DEPLOYMENTS_DIR", str(tmp_path / "deployments"))
    return tmp_path / "deployments"


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_a_local_server_that_died_no_longer_counts_as_deployed(records, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    rec = deployments.record_deployment("models:/m@champion", "m", "2", "local", "http://127.0.0.1:9", pid=dead.pid)
    (listed,) = deployments.list_deployments()
    assert listed["status"] == "stopped" and deployments.active_for("m", "2") == []  # nothing serves it
    assert main(["deployments", "list"]) == 0
    assert "stopped" in capsys.readouterr().out
    assert main(["undeploy", rec["id"]]) == 0  # the record can still be closed
    assert "not running" in capsys.readouterr().out
    assert deployments.get_deployment(rec["id"])["state"] == "deleted"
    assert main(["deployments", "list"]) == 0
    assert "no deployments" in capsys.readouterr().err
    assert main(["deployments", "list", "--all"]) == 0
    assert "deleted" in capsys.readouterr().out


def test_a_running_server_azure_deployment_or_another_hosts_server_counts(records, sleeper):
    from phitune.serving.server import process_start_time

    live = deployments.record_deployment("models:/m/1", "m", "1", "local", "http://127.0.0.1:9", pid=sleeper.pid,
                                         pid_started=process_start_time(sleeper.pid))
    azure = deployments.record_deployment("models:/m/2", "m", "2", "azureml", "https://x.inference.ml.azure.com/score",
                                          endpoint_name="phitune-m", deployment_name="blue")
    # a pid on another machine cannot be checked from here: it counts
    remote = deployments.record_deployment("models:/m/3", "m", "3", "local", "http://10.0.0.9:8000", pid=1,
                                           host="not-" + socket.gethostname())
    assert {d["id"] for d in deployments.active_for("m")} == {live["id"], azure["id"], remote["id"]}


def test_a_reused_pid_does_not_keep_a_dead_server_deployed(records, sleeper):
    from phitune.serving.server import process_start_time

    started = process_start_time(sleeper.pid)
    if started is None:
        pytest.skip("no /proc here: start times cannot be compared")
    deployments.record_deployment("models:/m/1", "m", "1", "local", "http://127.0.0.1:9", pid=sleeper.pid,
                                  pid_started=str(int(started) + 1))  # the server had that pid; now another process
    (listed,) = deployments.list_deployments()
    assert listed["status"] == "stopped" and deployments.active_for("m") == []


def test_undeploy_never_signals_a_reused_pid(records, sleeper, capsys):
    from phitune.serving.server import process_start_time

    started = process_start_time(sleeper.pid)
    if started is None:
        pytest.skip("no /proc here: start times cannot be compared")
    rec = deployments.record_deployment("models:/m/1", "m", "1", "local", "http://127.0.0.1:9", pid=sleeper.pid,
                                        pid_started=str(int(started) + 1))  # "another" process with that pid
    assert main(["undeploy", rec["id"]]) == 0
    assert "belongs to another process" in capsys.readouterr().out
    assert sleeper.poll() is None  # untouched


def test_undeploy_stops_the_recorded_process(records, sleeper, capsys):
    from phitune.serving.server import process_start_time

    rec = deployments.record_deployment("models:/m/1", "m", "1", "local", "http://127.0.0.1:9", pid=sleeper.pid,
                                        pid_started=process_start_time(sleeper.pid))
    assert main(["undeploy", rec["id"]]) == 0
    assert f"stopped the server (pid {sleeper.pid})" in capsys.readouterr().out
    assert sleeper.wait(10) != 0


def test_undeploy_of_an_azure_deployment_goes_through_azure(records, monkeypatch, capsys):
    from phitune.azure import endpoint
    calls = []

    def fake_undeploy(record, **kwargs):
        calls.append(record)
        return f"deleted endpoint {record['endpoint_name']}"

    monkeypatch.setattr(endpoint, "undeploy_azure", fake_undeploy)
    rec = deployments.record_deployment("models:/m/3", "m", "3", "azureml", "https://x.inference.ml.azure.com/score",
                                        endpoint_name="phitune-m", deployment_name="blue")
    assert main(["undeploy", rec["id"]]) == 0
    assert [c["id"] for c in calls] == [rec["id"]]
    assert "deleted endpoint phitune-m" in capsys.readouterr().out
    assert deployments.get_deployment(rec["id"])["state"] == "deleted"


def test_undeploy_unknown_id(records, capsys):
    assert main(["undeploy", "nope"]) == 1
    assert "no deployment 'nope'" in capsys.readouterr().err
