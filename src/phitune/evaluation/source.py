"""Model URI -> (base reference, adapter folder): what `load_for_inference` needs.

Accepted:
  models:/NAME@ALIAS, models:/NAME/VERSION   a registered version (phitune's pyfunc chat model)
  models:/m-<id>                             an MLflow 3 logged model
  runs:/RUN_ID/model                         a run's MLflow model
  runs:/RUN_ID/checkpoints/epoch-002         a kept epoch's adapter, logged in the run
  a local folder                             an MLflow model (MLmodel), a training checkpoint
                                             (epoch-NNN/ with adapter/), a peft adapter
                                             (adapter_config.json) or a full model (config.json)

A phitune pyfunc model carries its base as `artifacts/base.json`. A checkpoint in a
run takes the base of that run's model (or, without one, of its config.yaml); a bare
local folder takes the `model` config group (tiny-phi3 unless told otherwise).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from phitune.errors import PhituneError


@dataclass
class ModelSource:
    uri: str
    kind: str  # registered | logged | run-model | checkpoint | folder
    base_ref: dict
    adapter_dir: Optional[str]  # local folder: peft adapter or full model; None = the base alone
    run_id: Optional[str] = None  # the training run it came from, when known
    model_name: Optional[str] = None  # registered model name and version, when it is one
    model_version: Optional[str] = None
    checkpoint: Optional[str] = None  # "epoch-002" for a checkpoint

    @property
    def context_length(self) -> Optional[int]:
        value = self.base_ref.get("context_length")
        return int(value) if value else None

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


def _download(uri: str, dst: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    dst.mkdir(parents=True, exist_ok=True)
    try:
        with quiet_downloads():
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        raise PhituneError(f"{uri}: cannot download it from the tracking store "
                           f"({' '.join(str(exc).split())[:300]})") from None


def read_pyfunc_model(folder: Path) -> tuple[dict, Optional[str], Optional[str]]:
    """(base_ref, adapter_dir, run_id) of a phitune pyfunc model folder (with MLmodel)."""
    import yaml

    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    artifacts = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    if "base" not in artifacts:
        raise PhituneError(f"{folder}: an MLflow model, but not one of phitune's chat models (no `base` artifact)")
    base_ref = json.loads((folder / artifacts["base"]["path"]).read_text())
    adapter = folder / artifacts["adapter"]["path"] if "adapter" in artifacts else None
    return base_ref, (str(adapter) if adapter is not None else None), mlmodel.get("run_id")


def run_base_reference(run_id: str, workdir: Path) -> dict:
    """The base model of a training run: its MLflow model's base.json, else its config.yaml."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with quiet_downloads():
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/model/artifacts/base.json",
                                                       dst_path=str(workdir / "base"))
        return json.loads(Path(path).read_text())
    except (MlflowException, OSError, ValueError):
        pass
    try:
        with quiet_downloads():
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/config.yaml",
                                                       dst_path=str(workdir / "config"))
    except (MlflowException, OSError) as exc:
        raise PhituneError(f"run {run_id}: neither a logged model nor a config.yaml says which base model it "
                           f"fine-tuned ({' '.join(str(exc).split())[:200]})") from None
    from omegaconf import OmegaConf

    from phitune.modeling.loader import base_reference

    cfg = OmegaConf.load(path)
    return dict(base_reference(cfg.model), context_length=int(cfg.model.context_length),
                method=cfg.get("train", {}).get("method", "lora"))


def _fallback_base(model_cfg) -> dict:
    if model_cfg is None:
        raise PhituneError("a bare adapter folder does not say which base model it belongs to: set model=NAME")
    from phitune.modeling.loader import base_reference

    ref = base_reference(model_cfg)
    ref["context_length"] = int(model_cfg.context_length)
    print(f"note: base model {ref.get('name')} (the `model` config group) for this folder", file=sys.stderr)
    return ref


def _registered(uri: str):
    """(name, version) of a models:/NAME@ALIAS or models:/NAME/VERSION uri, else None."""
    from mlflow.tracking import MlflowClient

    rest = uri[len("models:/"):]
    client = MlflowClient()
    from mlflow.exceptions import MlflowException

    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, client.get_model_version_by_alias(name, alias).version
        if "/" in rest:
            name, version = rest.split("/", 1)
            if version.isdigit():
                return name, client.get_model_version(name, version).version
    except MlflowException as exc:
        raise PhituneError(f"{uri}: no such registered model version ({' '.join(str(exc).split())[:200]}); "
                           "see `phitune models list`") from None
    return None


def _local(folder: Path, model_cfg, uri: str, workdir: Path) -> ModelSource:
    if (folder / "MLmodel").is_file():
        base, adapter, run_id = read_pyfunc_model(folder)
        return ModelSource(uri, "folder", base, adapter, run_id=run_id)
    state = folder / "state.json"
    if (folder / "adapter").is_dir():  # a training checkpoint: checkpoints/<exp>/<hash>/epoch-NNN
        run_id = None
        if state.is_file():
            run_id = json.loads(state.read_text()).get("run_id")
        base = None
        if run_id:
            try:
                base = run_base_reference(run_id, workdir)
            except PhituneError:
                base = None
        return ModelSource(uri, "checkpoint", base or _fallback_base(model_cfg), str(folder / "adapter"),
                           run_id=run_id, checkpoint=folder.name if folder.name.startswith("epoch-") else None)
    if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return ModelSource(uri, "folder", _fallback_base(model_cfg), str(folder),
                           checkpoint=folder.name if folder.name.startswith("epoch-") else None)
    raise PhituneError(f"{uri}: not a model folder (expected MLmodel, adapter/, adapter_config.json or config.json)")


def resolve_model(uri: str, workdir: Path, model_cfg=None) -> ModelSource:
    """Resolve a model URI or folder, downloading what is needed into `workdir`.

    MLflow's tracking URI must be set (mlflow.set_tracking_uri) for models:/ and runs:/.
    """
    workdir = Path(workdir)
    uri = str(uri).strip()
    if uri.startswith("models:/"):
        registered = _registered(uri)
        folder = _download(uri, workdir / "model")
        base, adapter, run_id = read_pyfunc_model(folder)
        if registered:
            from mlflow.tracking import MlflowClient

            name, version = registered
            mv = MlflowClient().get_model_version(name, version)
            return ModelSource(uri, "registered", base, adapter, run_id=mv.run_id or run_id, model_name=name,
                               model_version=str(version), checkpoint=(mv.tags or {}).get("phitune.checkpoint"))
        return ModelSource(uri, "logged", base, adapter, run_id=run_id)
    if uri.startswith("runs:/"):
        rest = uri[len("runs:/"):].strip("/")
        run_id, _, path = rest.partition("/")
        if not run_id or not path:
            raise PhituneError(f"{uri}: expected runs:/RUN_ID/model or runs:/RUN_ID/checkpoints/epoch-NNN")
        folder = _download(uri, workdir / "run")
        if (folder / "MLmodel").is_file():
            base, adapter, _ = read_pyfunc_model(folder)
            return ModelSource(uri, "run-model", base, adapter, run_id=run_id)
        if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
            name = Path(path).name
            return ModelSource(uri, "checkpoint", run_base_reference(run_id, workdir), str(folder), run_id=run_id,
                               checkpoint=name if name.startswith("epoch-") else None)
        raise PhituneError(f"{uri}: neither an MLflow model nor an adapter checkpoint")
    folder = Path(uri).expanduser()
    if not folder.is_dir():
        raise PhituneError(f"{uri}: no such folder, and not a models:/ or runs:/ URI")
    return _local(folder.resolve(), model_cfg, uri, workdir)
