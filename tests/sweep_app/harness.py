"""Run the toy app (or train.py) as `python ... -m` in a subprocess, each test with its own stores."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP = Path(__file__).resolve().parent / "app.py"
_TEMPLATE: Path | None = None


def mlflow_template_db() -> Path:
    """An empty MLflow sqlite store, one per MLflow version in the temp folder: MLflow's
    schema migrations take ~5 s per new database, so each test copies this file instead."""
    global _TEMPLATE
    if _TEMPLATE is None:
        import mlflow
        from mlflow.tracking import MlflowClient

        path = Path(tempfile.gettempdir()) / f"phitune-mlflow-template-{mlflow.__version__}.db"
        if not path.exists():
            with tempfile.TemporaryDirectory() as tmp:  # build aside, then rename: atomic for parallel runs
                db = Path(tmp) / "mlflow.db"
                MlflowClient(f"sqlite:///{db}").search_experiments()
                shutil.move(str(db), str(path.with_suffix(f".{os.getpid()}.tmp")))
                os.replace(path.with_suffix(f".{os.getpid()}.tmp"), path)
        _TEMPLATE = path
    return _TEMPLATE


@dataclass
class Stores:
    root: Path

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.root}/optuna.db"

    @property
    def mlflow_url(self) -> str:
        return f"sqlite:///{self.root}/mlruns/mlflow.db"

    @property
    def trace(self) -> Path:
        return self.root / "trace.txt"

    def overrides(self, sweep_dir: str = "multirun") -> list[str]:
        return [f"hydra.sweeper.storage={self.optuna_url}", f"tracking.uri={self.mlflow_url}",
                f"hydra.sweep.dir={self.root / sweep_dir}", f"toy.log={self.trace}"]

    def trace_lines(self) -> list[str]:
        return self.trace.read_text().splitlines() if self.trace.exists() else []


def make_stores(tmp_path: Path) -> Stores:
    (tmp_path / "mlruns").mkdir(parents=True, exist_ok=True)
    shutil.copy(mlflow_template_db(), tmp_path / "mlruns" / "mlflow.db")
    return Stores(tmp_path)


def env() -> dict:
    # Not MLflow's variables of this test process: mlflow.set_tracking_uri() in an earlier
    # in-process test exports MLFLOW_TRACKING_URI, which a sweep would otherwise log into.
    e = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("PHITUNE_ROOT", str(REPO))
    e["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return e


def toy_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(APP), "-m", *overrides]


def run(cmd: list[str], timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=cwd or REPO)


def _default_sigint() -> None:
    # A test run started in the background (`make test &`) ignores SIGINT, and a child
    # inherits that: Python would then never raise KeyboardInterrupt for a Ctrl-C test.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, env=env(), cwd=cwd or REPO,
                            preexec_fn=_default_sigint)


def load_study(stores: Stores, name: str = "toy-sweep"):
    import optuna

    return optuna.load_study(study_name=name, storage=stores.optuna_url)


def runs(stores: Stores, experiment: str = "toy"):
    """(parent runs, child runs) of the experiment in the test's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stores.mlflow_url)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [], []
    all_runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("phitune.role") == "sweep"]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children
