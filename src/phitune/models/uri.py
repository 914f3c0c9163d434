"""Model URI -> ModelSource (base reference + adapter folder): one resolver for every command.

Accepted (serve, chat, eval, promote, deploy all take the same forms):
  models:/NAME@ALIAS      a registered version by alias, pinned once to its version
                          (the alias may move while the model downloads or is served)
  models:/NAME/VERSION    a registered version (VERSION may be `latest`)
  models:/m-<id>          an MLflow 3 logged model
  runs:/RUN_ID/model      a run's MLflow model (its registered name/version looked up)
  runs:/RUN_ID/checkpoints/epoch-002   a kept epoch's adapter, logged in the run
  a local folder          an MLflow model (MLmodel), a training checkpoint (epoch-NNN/
                          with adapter/), a peft adapter (adapter_config.json) or a full
                          model (config.json)

A phitune chat model (phitune.tracking.pyfunc_model) carries its base as the artifact
`base.json`. A checkpoint in a run takes the base of that run's model (or, without one,
of its config.yaml); a bare local folder takes the `model` config group.

Tracking store: `tracking_uri()` is the one rule for which store a command reads
(--tracking-uri, else $MLFLOW_TRACKING_URI, else phitune's sqlite default), and
`client_for()` the one way to open it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from phitune.errors import PhituneError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+|latest)/?$")
_LOGGED = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)/?$")
_RUN = re.compile(r"^runs:/(?P<run_id>[0-9a-f]+)/(?P<path>.+?)/?$")
FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, runs:/RUN_ID/checkpoints/epoch-NNN or a folder"


def tracking_uri(explicit: Optional[str] = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else phitune's default sqlite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def client_for(uri: str):
    """MlflowClient on `uri`, also set as MLflow's process-wide tracking and registry URI
    (MLflow's models:/ artifact repository reads those, whatever else is passed). A sqlite
    store that does not exist yet is an error, not a new empty database."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise PhituneError(f"no MLflow store at {db} (tracking URI {uri}): train something first "
                               "(python train.py), or pass --tracking-uri / set MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclass
class ModelSource:
    uri: str  # as given
    resolved_uri: str  # what was downloaded: an alias pinned to its version
    kind: str  # registered | logged | run-model | checkpoint | folder
    base_ref: dict
    adapter_dir: Optional[str]  # peft adapter or full model; None = the base alone
    local_dir: Optional[Path] = None  # the downloaded (or given) folder
    run_id: Optional[str] = None  # the training run it came from, when known
    model_name: Optional[str] = None  # registered model name and version, when it is one
    model_version: Optional[str] = None
    checkpoint: Optional[str] = None  # "epoch-002" for a checkpoint

    @property
    def context_length(self) -> Optional[int]:
        value = self.base_ref.get("context_length")
        return int(value) if value else None

    @property
    def served_name(self) -> str:
        return self.model_name or self.base_ref.get("served_name") or self.base_ref.get("name") or "phitune"

    def describe(self) -> str:
        where = f"{self.model_name} version {self.model_version}" if self.model_name else self.uri
        extra = [f"run {self.run_id}"] if self.run_id else []
        if self.checkpoint:
            extra.append(self.checkpoint)
        return where + (f" ({', '.join(extra)})" if extra else "")


@contextlib.contextmanager
def quiet_downloads():
    """No MLflow "Downloading artifacts" progress bar per download (restored afterwards)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _one_line(exc, limit: int = 300) -> str:
    return " ".join(str(getattr(exc, "message", None) or exc).split())[:limit]


def download(uri: str, dst: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    dst.mkdir(parents=True, exist_ok=True)
    try:
        with quiet_downloads():
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        raise PhituneError(f"{uri}: cannot download it from the tracking store ({_one_line(exc)})") from None


def read_pyfunc_model(folder: Path, uri: str) -> tuple[dict, Optional[str], Optional[str]]:
    """(base_ref, adapter_dir, run_id) of a phitune chat model folder (with MLmodel)."""
    import yaml

    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text()) or {}
    except yaml.YAMLError as exc:
        raise PhituneError(f"{folder / 'MLmodel'}: not valid YAML: {_one_line(exc)}") from None
    artifacts = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    base = folder / (artifacts.get("base") or {}).get("path", "artifacts/base.json")
    if not base.is_file():
        raise PhituneError(f"{uri}: an MLflow model, but not one of phitune's chat models (no base.json artifact "
                           f"in {folder}); phitune uses the MLflow model that `python train.py` logs")
    try:
        base_ref = json.loads(base.read_text())
    except (OSError, ValueError) as exc:
        raise PhituneError(f"{base}: cannot read the base model reference: {exc}") from None
    adapter = folder / (artifacts.get("adapter") or {}).get("path", "artifacts/adapter")
    from phitune.tracking.pyfunc_model import localize_base

    shipped = (artifacts.get("base_model") or {}).get("path")
    base_ref = localize_base(base_ref, str(folder / shipped) if shipped else None)
    return base_ref, (str(adapter) if adapter.is_dir() else None), mlmodel.get("run_id")


def run_base_reference(run_id: str, workdir: Path) -> dict:
    """The base model of a training run: its MLflow model's base.json, else its config.yaml."""
    from mlflow.exceptions import MlflowException

    try:
        path = download(f"runs:/{run_id}/model/artifacts/base.json", workdir / "base")
        base = json.loads(Path(path).read_text())
    except (PhituneError, MlflowException, OSError, ValueError):
        base = None
    if base is not None:
        from phitune.tracking.pyfunc_model import localize_base

        if base.get("shipped") and not (base.get("local_path") and Path(base["local_path"]).is_dir()):
            base["path"] = str(download(f"runs:/{run_id}/model/artifacts/{base['shipped']}", workdir / "base_model"))
        return localize_base(base)
    try:
        path = download(f"runs:/{run_id}/config.yaml", workdir / "config")
    except PhituneError as exc:
        raise PhituneError(f"run {run_id}: neither a logged model nor a config.yaml says which base model it "
                           f"fine-tuned ({exc})") from None
    from omegaconf import OmegaConf

    from phitune.modeling.loader import base_reference

    cfg = OmegaConf.load(path)
    return dict(base_reference(cfg.model), context_length=int(cfg.model.context_length),
                method=cfg.get("train", {}).get("method", "lora"))


def _fallback_base(model_cfg) -> dict:
    if model_cfg is None:
        raise PhituneError("a bare adapter folder does not say which base model it belongs to: set model=NAME")
    from phitune.modeling.loader import base_reference

    ref = dict(base_reference(model_cfg), context_length=int(model_cfg.context_length))
    print(f"note: base model {ref.get('name')} (the `model` config group) for this folder", file=sys.stderr)
    return ref


def _epoch(name: str) -> Optional[str]:
    return name if name.startswith("epoch-") else None


def _folder(uri: str, folder: Path, model_cfg, workdir: Path) -> ModelSource:
    if (folder / "MLmodel").is_file():
        base, adapter, run_id = read_pyfunc_model(folder, uri)
        return ModelSource(uri, uri, "folder", base, adapter, folder, run_id=run_id)
    if (folder / "adapter").is_dir():  # a training checkpoint: checkpoints/<exp>/<hash>/epoch-NNN
        state = folder / "state.json"
        run_id = json.loads(state.read_text()).get("run_id") if state.is_file() else None
        base = None
        if run_id:
            with contextlib.suppress(PhituneError):
                base = run_base_reference(run_id, workdir)
        return ModelSource(uri, uri, "checkpoint", base or _fallback_base(model_cfg), str(folder / "adapter"), folder,
                           run_id=run_id, checkpoint=_epoch(folder.name))
    if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return ModelSource(uri, uri, "folder", _fallback_base(model_cfg), str(folder), folder,
                           checkpoint=_epoch(folder.name))
    raise PhituneError(f"{uri}: not a model folder (expected MLmodel, adapter/, adapter_config.json or config.json)")


def _mlflow_call(what: str, fn, *args, **kwargs):
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        raise PhituneError(f"{what}: {_one_line(exc, 400)}; see `phitune models list`") from None


def registered_version(uri: str, client) -> Optional[tuple]:
    """(name, model version) of a models:/NAME@ALIAS or models:/NAME/VERSION uri, else None."""
    if m := _ALIAS.match(uri):
        mv = _mlflow_call(f"{uri}: no alias @{m['alias']} on registered model {m['name']!r}",
                          client.get_model_version_by_alias, m["name"], m["alias"])
        return m["name"], mv
    if m := _VERSION.match(uri):
        if m["version"] != "latest":
            return m["name"], _mlflow_call(f"{uri}: no version {m['version']} of registered model {m['name']!r}",
                                           client.get_model_version, m["name"], m["version"])
        versions = _mlflow_call(f"{uri}: no registered model {m['name']!r}", client.search_model_versions,
                                f"name='{m['name']}'")
        if not versions:
            raise PhituneError(f"{uri}: registered model {m['name']!r} has no versions")
        return m["name"], max(versions, key=lambda v: int(v.version))
    return None


def _from_registry(uri: str, client, workdir: Path) -> ModelSource:
    found = registered_version(uri, client)
    if found is None:
        if not _LOGGED.match(uri):
            raise PhituneError(f"{uri}: expected {FORMS}")
        folder = download(uri, workdir / "model")
        if files := _checkpoint_files(folder, client, _LOGGED.match(uri)["id"]):
            return _from_run(files, client, workdir)
        base, adapter, run_id = read_pyfunc_model(folder, uri)
        if run_id is None:  # files logged into an epoch's LoggedModel outside its run: its source run
            run_id = client.get_logged_model(_LOGGED.match(uri)["id"]).source_run_id
        return ModelSource(uri, uri, "logged", base, adapter, folder, run_id=run_id)
    name, mv = found
    pinned = f"models:/{name}/{mv.version}"
    folder = download(pinned, workdir / "model")
    logged = _LOGGED.match(mv.source or "")  # the version's LoggedModel, models:/<model_id>
    if files := _checkpoint_files(folder, client, getattr(mv, "model_id", None) or (logged and logged["id"])):
        src = _from_run(files, client, workdir)
        return replace(src, uri=uri, resolved_uri=pinned, kind="registered", model_name=name,
                                   model_version=str(mv.version))
    base, adapter, run_id = read_pyfunc_model(folder, uri)
    return ModelSource(uri, pinned, "registered", base, adapter, folder, run_id=mv.run_id or run_id,
                       model_name=name, model_version=str(mv.version),
                       checkpoint=(mv.tags or {}).get("phitune.checkpoint"))


def _checkpoint_files(folder: Path, client, model_id: Optional[str]) -> Optional[str]:
    """runs:/RUN/checkpoints/epoch-NNN when `folder` (a downloaded LoggedModel) holds no model
    and the LoggedModel is a kept epoch's (tag phitune.files): MLflow's Models tab lists those
    and lets a user register one before `phitune promote --checkpoint N` gives it files."""
    if (folder / "MLmodel").is_file() or not model_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return (client.get_logged_model(model_id).tags or {}).get("phitune.files")
    except MlflowException:
        return None


def _registered_from_run(client, run_id: str) -> tuple:
    """(name, version) of the registered version made from this run's model, when exactly one name has it."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"run_id='{run_id}'")
    except MlflowException:
        return None, None
    if len({v.name for v in versions}) != 1:
        return None, None
    best = max(versions, key=lambda v: int(v.version))
    return best.name, str(best.version)


def _from_run(uri: str, client, workdir: Path) -> ModelSource:
    m = _RUN.match(uri)
    if not m:
        raise PhituneError(f"{uri}: expected runs:/RUN_ID/model or runs:/RUN_ID/checkpoints/epoch-NNN")
    run_id = m["run_id"]
    folder = download(uri, workdir / "run")
    if (folder / "MLmodel").is_file():
        base, adapter, _ = read_pyfunc_model(folder, uri)
        name, version = _registered_from_run(client, run_id)
        return ModelSource(uri, uri, "run-model", base, adapter, folder, run_id=run_id, model_name=name,
                           model_version=version)
    if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return ModelSource(uri, uri, "checkpoint", run_base_reference(run_id, workdir), str(folder), folder,
                           run_id=run_id, checkpoint=_epoch(Path(m["path"]).name))
    raise PhituneError(f"{uri}: neither an MLflow model nor an adapter checkpoint")


def resolve(uri: str, tracking: Optional[str] = None, workdir: Optional[Path] = None, model_cfg=None) -> ModelSource:
    """Resolve a model URI or folder; models:/ and runs:/ are downloaded into `workdir`
    (a new temp folder when None). No weights are loaded here."""
    uri = str(uri).strip()
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="phitune-model-"))
    if uri.startswith("models:/"):
        return _from_registry(uri, client_for(tracking_uri(tracking)), workdir)
    if uri.startswith("runs:/"):
        return _from_run(uri, client_for(tracking_uri(tracking)), workdir)
    folder = Path(uri).expanduser()
    if not folder.is_dir():
        raise PhituneError(f"{uri}: no such folder; expected {FORMS}")
    return _folder(uri, folder.resolve(), model_cfg, workdir)
