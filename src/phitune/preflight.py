"""Checks before compute: every place a run will write, tried before a model is built.

    check_run(cfg)          the backend table, then (local backend, main process) the
                            output folder and the tracking store; returns the Backend
    check_hydra_dirs(argv)  hydra.run.dir / hydra.sweep.dir from the command line, which
                            Hydra creates before train.py's main runs

Each failure is a PhituneError whose one line names the setting to change. Without
them a checkpoint folder under a file fails after a whole epoch, and an MLflow server
that is not there costs ~250 s of MLflow's HTTP retries, then stacked tracebacks.

Cheap to import (no torch, no MLflow): train.py calls check_run before importing the
recipe, so a bad folder or store is reported in about a second, not after the ~3 s
import of torch. The recipe calls it too, for callers of `phitune.recipe.run`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import OmegaConf

from phitune import backends
from phitune.errors import PhituneError

HTTP_TIMEOUT_S = 2.0  # one request, no retries: a live server answers /health in milliseconds
DB_CONNECT_TIMEOUT_S = 3  # whole seconds: libpq's and MySQL's connect_timeout take an integer


# -- where a run writes ----------------------------------------------------------------------

def config_hash(cfg) -> str:
    """Identity of a run's settings, for its checkpoint folder: the same command resumes."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("resume", None)
    c.get("train", {}).pop("progress", None)
    c.get("tracking", {}).pop("parent_run_id", None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_output_dir(cfg) -> Path:
    return Path("checkpoints") / cfg.tracking.experiment / config_hash(cfg)


# -- the checks ------------------------------------------------------------------------------

def check_run(cfg) -> backends.Backend:
    """Refuse a run that cannot finish, before any compute; returns its backend."""
    trial = bool(OmegaConf.select(cfg, "trial.storage", default=None))
    backend = backends.lookup(OmegaConf.select(cfg, "backend.name", default=None), "trial" if trial else "run",
                              OmegaConf.select(cfg, "task.name", default=None) or "chat")
    # torchrun's RANK: the folders and the store are rank 0's to write; other ranks only train.
    if backend.name == "local" and os.environ.get("RANK", "0") == "0":
        check_output_dir(cfg)
        check_tracking(cfg.tracking)
    return backend


def check_output_dir(cfg) -> None:
    """train.output_dir (or checkpoints/<experiment>/<hash>) can hold checkpoints."""
    given = cfg.train.get("output_dir")
    out = Path(given) if given else default_output_dir(cfg)
    problem = folder_problem(out)
    if problem is None and not cfg.get("resume") and out.is_dir() and any(out.iterdir()):
        # A fresh run moves the previous attempt aside to <out>.prev: the parent takes that rename.
        prev = out.with_name(out.name + ".prev")
        problem = _unwritable(out.parent)
        if problem is None and prev.exists() and not prev.is_dir():
            problem = f"{prev} is not a folder"
    if problem:
        setting = f"train.output_dir={given}" if given else f"train.output_dir (default {out})"
        raise PhituneError(f"{setting}: {problem}; set train.output_dir to a writable folder")


def check_tracking(tracking_cfg) -> None:
    """The MLflow store answers, or its sqlite file can be created; skipped inside an Azure ML job."""
    from phitune.tracking.context import azure_run_context

    if azure_run_context() is not None:
        return  # Azure opened the run and its store for this job; tracking.uri is not used there
    uri = str(tracking_cfg.uri)
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        _check_http(uri)
    elif scheme.split("+", 1)[0] in ("postgresql", "postgres", "mysql"):
        _check_database(uri)
    # databricks, azureml and others: their own clients and credentials; nothing cheap to try
    root = str(tracking_cfg.get("artifact_root") or "")
    local = root[len("file://"):] if root.startswith("file://") else ("" if "://" in root else root)
    if local:  # s3://, wasbs://, ... are their clients' to check
        problem = folder_problem(Path(local))
        if problem:
            raise PhituneError(f"tracking.artifact_root={root}: {problem}; "
                               "set tracking.artifact_root to a writable folder")


def check_hydra_dirs(argv: list[str]) -> None:
    """hydra.run.dir (one run) or hydra.sweep.dir (-m) given on the command line can be made.

    Hydra makes that folder before main() runs, so a bad one would end in Hydra's
    traceback. A value with `${...}` is checked up to its first interpolation.
    """
    if any(a in ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info") for a in argv):
        return  # Hydra prints and exits without making a folder
    key = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in argv) else "hydra.run.dir"
    for arg in argv:
        name, sep, value = arg.partition("=")
        if not sep or name.lstrip("+~") != key:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        literal = value.split("${", 1)[0]
        if not literal:
            continue
        folder = Path(literal) if literal.endswith("/") or literal == value else Path(literal).parent
        problem = folder_problem(folder)
        if problem:
            raise PhituneError(f"{key}={value}: {problem}; set {key} to a writable folder")


# -- folders ---------------------------------------------------------------------------------

def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be (made into) a writable folder, or None.

    Creates nothing: the nearest existing ancestor must be a folder that takes a file.
    """
    probe = Path(path)
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if probe.is_symlink() and not probe.exists():
        return f"{probe} is a broken link"
    if not probe.is_dir():
        return f"{probe} is a file, not a folder" if probe.is_file() else f"{probe} is not a folder"
    return _unwritable(probe)


def _unwritable(folder: Path) -> str | None:
    # A real write, not os.access: root passes every access check, and read-only mounts lie to it.
    try:
        fd, name = tempfile.mkstemp(prefix=".phitune-write-check-", dir=folder)
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(name)
    return None


# -- tracking stores -------------------------------------------------------------------------

def _shown(uri: str) -> str:
    from phitune.redact import redact_text

    return redact_text(uri)


def _check_sqlite(uri: str) -> None:
    if not uri.startswith("sqlite:///"):
        return  # sqlite:// is an in-memory database
    db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if str(db) in ("", ":memory:"):
        return
    problem = (f"{db} is a folder, not a database file" if db.is_dir() else
               folder_problem(db.parent) or folder_problem(db.parent / "artifacts"))  # artifacts live beside the db
    if problem:
        raise PhituneError(f"tracking.uri={_shown(uri)}: {problem}; "
                           "set tracking.uri to a database in a writable folder")


def _check_http(uri: str) -> None:
    """MLflow's /health (open even behind its auth), else its search API, answers; no retries."""
    try:
        parts = urlsplit(uri)
        # Userinfo stays out of the request: reachability needs no credentials.
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else (parts.hostname or "")
        base = f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}"
    except ValueError as exc:  # a port that is not a number
        raise PhituneError(f"tracking.uri={_shown(uri)}: {exc}; set tracking.uri") from None
    answers = []
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        status, why = _http_status(base + path)
        if why:
            raise PhituneError(f"tracking.uri={_shown(uri)}: no MLflow server answers there ({why}); "
                               "start one or set tracking.uri")
        if status in (200, 401, 403):  # 401/403: a front door asking for MLflow's credentials
            return
        answers.append(f"GET {path.split('?')[0]}: HTTP {status}")
    raise PhituneError(f"tracking.uri={_shown(uri)}: the server there does not answer as MLflow "
                       f"({'; '.join(answers)}); "
                       "set tracking.uri to an MLflow tracking server")


def _http_status(url: str) -> tuple[int | None, str | None]:
    """(HTTP status, None), or (None, why nothing answered)."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=HTTP_TIMEOUT_S) as resp:
            return resp.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            # Something answers; certificates are MLflow's own settings (MLFLOW_TRACKING_INSECURE_TLS ...).
            return 200, None
        return None, _network_reason(exc.reason)
    except ssl.SSLError:
        return 200, None
    except OSError as exc:  # a timeout while reading the answer
        return None, _network_reason(exc)


def _network_reason(reason) -> str:
    import socket

    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {HTTP_TIMEOUT_S:g} s"
    if isinstance(reason, socket.gaierror):
        return "host name not found"
    return str(getattr(reason, "strerror", None) or reason)


def _check_database(uri: str) -> None:
    """A quick connect, when the driver is installed; MLflow reports a missing driver itself."""
    try:
        import sqlalchemy
        from sqlalchemy.pool import NullPool
    except ImportError:
        return
    try:
        url = sqlalchemy.engine.make_url(uri)
        if url.get_dialect().driver not in ("psycopg2", "psycopg", "pymysql", "mysqldb"):
            return  # a driver whose timeout setting is not connect_timeout: nothing quick to try
        engine = sqlalchemy.create_engine(url, poolclass=NullPool,
                                          connect_args={"connect_timeout": DB_CONNECT_TIMEOUT_S})
    except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError):
        return  # no driver installed, or a URL SQLAlchemy does not take: MLflow will say so itself
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as exc:
        first = (str(exc.orig).strip().splitlines() or ["no answer"])[0]
        if url.password:
            first = first.replace(url.password, "***")
        raise PhituneError(f"tracking.uri={_shown(uri)}: cannot connect to the database ({_shown(first)}); "
                           "start it, correct the URI, or set tracking.uri") from None
    finally:
        engine.dispose()
