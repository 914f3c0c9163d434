"""Checks before compute: a folder or tracking store that cannot work is one `error:` line
and exit 1 within seconds, before a model is built, never a traceback."""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from sweep_app.harness import REPO, make_stores, run

from phitune import preflight
from phitune.errors import PhituneError

PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python"
# A bad setting is refused before torch is imported: the whole process takes about a second here.
LIMIT_S = 5.0


def closed_port() -> int:
    """A local port nothing listens on (bound, then released): a connect is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tmp_path: Path, *overrides: str, multirun: bool = False):
    """`python train.py` in tmp_path (checkpoints/ and outputs/ land there); (result, seconds)."""
    cmd = [PYTHON, str(REPO / "train.py"), *(["-m"] if multirun else []),
           # Bounded, in case a check is missing: one optimizer step, no model logging or end-of-run evaluation.
           "train.max_steps=1", "train.progress=false", "tracking.log_model=false", "train.evaluate_at_end=false",
           *overrides]
    t0 = time.monotonic()
    res = run(cmd, timeout=600, cwd=tmp_path)
    return res, time.monotonic() - t0


def assert_refused(res, seconds: float, setting: str) -> str:
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and setting in errors[0], res.stderr[-3000:]
    assert seconds < LIMIT_S, f"refused after {seconds:.1f} s: {errors[0]}"
    return errors[0]


def mlflow_runs(stores) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stores.mlflow_url)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("not a folder\n")
    return f


# -- python train.py, each bad place in turn ---------------------------------------------------

def test_output_dir_under_a_file(tmp_path, a_file):
    s = make_stores(tmp_path)
    res, seconds = train(tmp_path, f"train.output_dir={a_file}/out", f"tracking.uri={s.mlflow_url}",
                         f"hydra.run.dir={tmp_path}/run")
    line = assert_refused(res, seconds, f"train.output_dir={a_file}/out")
    assert f"{a_file} is a file, not a folder" in line and "set train.output_dir" in line
    assert mlflow_runs(s) == []  # refused before a run was opened


def test_default_checkpoint_folder_under_a_file(tmp_path):
    s = make_stores(tmp_path)
    (tmp_path / "checkpoints").write_text("a file where checkpoints/<experiment>/<hash> would go\n")
    res, seconds = train(tmp_path, f"tracking.uri={s.mlflow_url}", f"hydra.run.dir={tmp_path}/run")
    line = assert_refused(res, seconds, "train.output_dir (default checkpoints/phitune/")
    assert "checkpoints is a file, not a folder" in line
    assert mlflow_runs(s) == []


def test_tracking_store_under_a_file(tmp_path, a_file):
    uri = f"sqlite:///{a_file}/mlflow.db"
    res, seconds = train(tmp_path, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/run")
    line = assert_refused(res, seconds, f"tracking.uri={uri}")
    assert f"{a_file} is a file, not a folder" in line and "set tracking.uri" in line
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained


def test_unreachable_tracking_server(tmp_path):
    # MLflow's own client retries such a server for ~250 s, then prints stacked tracebacks.
    port = closed_port()
    res, seconds = train(tmp_path, f"tracking.uri=http://127.0.0.1:{port}", f"hydra.run.dir={tmp_path}/run")
    line = assert_refused(res, seconds, "tracking.uri=")
    assert line == (f"error: tracking.uri=http://127.0.0.1:{port}: no MLflow server answers there "
                    "(connection refused); start one or set tracking.uri")
    assert not (tmp_path / "checkpoints").exists()


def test_unreachable_tracking_server_stops_a_sweep_before_its_study(tmp_path):
    s = make_stores(tmp_path)
    port = closed_port()
    res, seconds = train(tmp_path, f"tracking.uri=http://127.0.0.1:{port}", f"hydra.sweeper.storage={s.optuna_url}",
                         f"hydra.sweep.dir={tmp_path}/multirun", "hydra.sweeper.n_trials=1", multirun=True)
    assert_refused(res, seconds, f"tracking.uri=http://127.0.0.1:{port}: no MLflow server answers there")
    assert not Path(s.optuna_url[len("sqlite:///"):]).exists()  # no study was created


@pytest.mark.parametrize("key, multirun", [("hydra.run.dir", False), ("hydra.sweep.dir", True)])
def test_hydra_dir_under_a_file(tmp_path, a_file, key, multirun):
    # Hydra makes this folder itself, before train.py's main() runs.
    s = make_stores(tmp_path)
    res, seconds = train(tmp_path, f"{key}={a_file}/out", f"tracking.uri={s.mlflow_url}",
                         f"hydra.sweeper.storage={s.optuna_url}", multirun=multirun)
    line = assert_refused(res, seconds, f"{key}={a_file}/out")
    assert line.endswith(f"{a_file} is a file, not a folder; set {key} to a writable folder")
    assert mlflow_runs(s) == []


# -- the checks themselves, in process ----------------------------------------------------------

def test_a_folder_that_can_be_made_passes_and_nothing_is_created(tmp_path):
    target = tmp_path / "new" / "deeper" / "out"
    assert preflight.folder_problem(target) is None
    assert list(tmp_path.iterdir()) == []  # the check writes a probe file and removes it; no folders


def test_a_hydra_dir_with_an_interpolation_is_checked_up_to_it(tmp_path, a_file):
    with pytest.raises(PhituneError, match="a-file is a file"):
        preflight.check_hydra_dirs([f"hydra.run.dir={a_file}/${{now:%H-%M-%S}}"])
    preflight.check_hydra_dirs([f"hydra.run.dir={tmp_path}/runs/${{now:%H-%M-%S}}"])  # fine: nothing raised
    preflight.check_hydra_dirs(["-m", f"hydra.run.dir={a_file}/x"])  # -m makes hydra.sweep.dir, not run.dir


class _Server:
    """A local HTTP server answering every GET with `status` (a stand-in front of MLflow's /health)."""

    def __init__(self, status: int):
        code = status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status", [200, 401])
def test_a_server_that_answers_passes(status):
    srv = _Server(status)  # 401: MLflow behind basic auth still answers
    try:
        preflight.check_tracking(OmegaConf.create({"uri": srv.url}))
    finally:
        srv.close()


def test_a_server_that_is_not_mlflow_is_refused():
    srv = _Server(404)
    try:
        with pytest.raises(PhituneError, match=r"does not answer as MLflow \(GET /health: HTTP 404"):
            preflight.check_tracking(OmegaConf.create({"uri": srv.url}))
    finally:
        srv.close()


def test_the_password_in_a_tracking_uri_is_never_shown():
    uri = f"http://alice:pw-canary-93f1@127.0.0.1:{closed_port()}"
    with pytest.raises(PhituneError) as err:
        preflight.check_tracking(OmegaConf.create({"uri": uri}))
    assert "pw-canary-93f1" not in str(err.value) and "alice:***@127.0.0.1" in str(err.value)
