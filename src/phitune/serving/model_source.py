"""From a model URI to a ChatGenerator, through MLflow, keeping who-is-served for the record.

    models:/NAME@ALIAS      a registered model by alias (resolved once, at start-up, to its version)
    models:/NAME/VERSION    a registered model version (VERSION may be `latest`)
    models:/m-...           an MLflow 3 logged model by id
    runs:/RUN_ID/model      a run's logged model (its registered name/version are looked up)
    DIR                     a downloaded MLflow model folder (MLmodel + artifacts/)

The model folder is phitune's pyfunc chat model (phitune.tracking.pyfunc_model):
artifacts `base.json` (how to rebuild the base model) and `adapter/` (the LoRA adapter
or a full fine-tuned model), loaded with phitune.modeling.loader.load_for_inference.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from phitune.errors import PhituneError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+|latest)/?$")
_LOGGED = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)/?$")
_RUN = re.compile(r"^runs:/(?P<run_id>[0-9a-f]+)/(?P<path>.+)$")


@dataclass
class ModelSource:
    uri: str  # as given
    resolved_uri: str  # what was downloaded (an alias pinned to its version)
    local_dir: Path
    base_ref: dict
    adapter_dir: Path | None
    model_name: str | None = None  # registered model name, when known
    model_version: str | None = None
    run_id: str | None = None

    @property
    def served_name(self) -> str:
        return self.model_name or self.base_ref.get("served_name") or self.base_ref.get("name") or "phitune"


def tracking_uri_or_default(tracking_uri: str | None = None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise PhituneError(f"no MLflow store at {db} (tracking URI {tracking_uri}); train a model first, "
                               "or pass --tracking-uri")
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _mlflow_call(what: str, fn, *args, **kwargs):
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        detail = " ".join(str(exc.message if hasattr(exc, "message") else exc).split())[:400]
        raise PhituneError(f"{what}: {detail}") from None


def resolve(uri: str, tracking_uri: str | None = None, dst_path: str | None = None) -> ModelSource:
    """Resolve and download (or find locally) the model; no weights are loaded yet."""
    import mlflow

    uri = str(uri).strip()
    if Path(uri).is_dir():
        return _from_dir(uri, uri, Path(uri))
    tracking_uri = tracking_uri_or_default(tracking_uri)
    name = version = run_id = None
    resolved = uri
    if m := _ALIAS.match(uri):
        client = _client(tracking_uri)
        name = m["name"]
        mv = _mlflow_call(f"{uri}: no alias @{m['alias']} on registered model {name!r}",
                          client.get_model_version_by_alias, name, m["alias"])
        version, run_id = str(mv.version), mv.run_id
        resolved = f"models:/{name}/{version}"  # pinned: the alias may move while we download
    elif m := _VERSION.match(uri):
        client = _client(tracking_uri)
        name = m["name"]
        if m["version"] == "latest":
            versions = _mlflow_call(f"{uri}: no registered model {name!r}", client.search_model_versions, f"name='{name}'")
            if not versions:
                raise PhituneError(f"{uri}: registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = _mlflow_call(f"{uri}: no version {m['version']} of registered model {name!r}",
                              client.get_model_version, name, m["version"])
        version, run_id = str(mv.version), mv.run_id
        resolved = f"models:/{name}/{version}"
    elif m := _RUN.match(uri):
        client = _client(tracking_uri)
        run_id = m["run_id"]
        # Which registered version(s) came from this run: the record needs a name for the delete guard.
        try:
            versions = client.search_model_versions(f"run_id='{run_id}'")
        except Exception:
            versions = []
        names = {v.name for v in versions}
        if len(names) == 1:
            best = max(versions, key=lambda v: int(v.version))
            name, version = best.name, str(best.version)
    elif _LOGGED.match(uri):
        _client(tracking_uri)
    else:
        raise PhituneError(f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
                           "or a model folder")
    # MLflow's models:/ artifact repository reads the process-wide URIs, whatever is passed below.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    local = _mlflow_call(f"{uri}: cannot download the model", mlflow.artifacts.download_artifacts,
                         artifact_uri=resolved, dst_path=dst_path, tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = _from_dir(uri, resolved, Path(local))
    source.model_name, source.model_version, source.run_id = name, version, run_id
    return source


def _from_dir(uri: str, resolved: str, folder: Path) -> ModelSource:
    import yaml

    mlmodel = folder / "MLmodel"
    artifacts = {}
    if mlmodel.is_file():
        try:
            meta = yaml.safe_load(mlmodel.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PhituneError(f"{mlmodel}: not valid YAML: {exc}") from None
        artifacts = ((meta.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    base = folder / (artifacts.get("base") or {}).get("path", "artifacts/base.json")
    adapter = folder / (artifacts.get("adapter") or {}).get("path", "artifacts/adapter")
    if not base.is_file():
        raise PhituneError(f"{uri}: not a phitune chat model (no base.json artifact in {folder}); "
                           "phitune serves the MLflow model that `python train.py` logs")
    try:
        base_ref = json.loads(base.read_text())
    except (OSError, ValueError) as exc:
        raise PhituneError(f"{base}: cannot read the base model reference: {exc}") from None
    return ModelSource(uri, resolved, folder, base_ref, adapter if adapter.is_dir() else None)


def load_generator(source: ModelSource, device: str = "cpu"):
    """Load base + adapter and wrap them in a ChatGenerator (the slow part: seconds to minutes)."""
    import warnings

    import transformers

    from phitune.modeling.generate import ChatGenerator
    from phitune.modeling.loader import load_for_inference

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    model, tokenizer = load_for_inference(source.base_ref, str(source.adapter_dir) if source.adapter_dir else None,
                                          device=device)
    context = int(source.base_ref.get("context_length") or getattr(model.config, "max_position_embeddings", 4096))
    return ChatGenerator(model, tokenizer, context)
