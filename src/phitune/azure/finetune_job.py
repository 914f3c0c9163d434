"""`python train.py backend=foundry`: Azure AI Foundry serverless fine-tuning, as the portal does it.

The Foundry wizard's steps, in code:

1. data: the local validator passes the training/validation files (an automatic
   split is done here, with the same seed as a local run, and written as two
   files); they are uploaded as `uri_file` data assets, versioned by content hash
   so the same file is uploaded once;
2. task parameters, from phitune's names (backend.hyperparameter_names):

   | phitune                                          | portal (default)          | trainer (SDK samples)          |
   |--------------------------------------------------|---------------------------|--------------------------------|
   | train.learning_rate_multiplier                   | learning_rate_multiplier  | learning_rate = model.base_learning_rate x multiplier |
   | model.base_batch_size x train.batch_size_multiplier | batch_size             | per_device_train_batch_size    |
   | train.epochs ("auto" resolved like a local run)  | n_epochs                  | num_train_epochs               |

3. `azure.ai.ml.finetuning.create_finetuning_job(model=..., task=ChatCompletion,
   training_data=<asset id>, validation_data=<asset id>, hyperparameters=...,
   output_model_name_prefix=...)`, submitted with MLClient;
4. the job is polled until it ends; the model it registered in the workspace is
   then registered in the local MLflow registry as a new version of the same
   name whose source is its azureml:// URI, tagged `azure_model_id` (its ARM id)
   and `azure_job_name`, so `phitune models`/`promote`/`deploy --target azureml`
   see it like a local model.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from datetime import date
from pathlib import Path
from typing import Optional

from phitune.errors import PhituneError

HYPERPARAMETER_NAMES = {
    "portal": ("learning_rate_multiplier", "batch_size", "n_epochs"),
    "trainer": ("learning_rate", "per_device_train_batch_size", "num_train_epochs"),
}


def hyperparameters(cfg, settings, n_examples: int) -> dict:
    """Foundry's hyperparameters (all strings, as the service takes them) from phitune's config."""
    from phitune.train.schedule import resolve_epochs

    style = str(settings.hyperparameter_names)
    if style not in HYPERPARAMETER_NAMES:
        raise PhituneError(f"backend.hyperparameter_names={style}: expected portal or trainer")
    lr_name, batch_name, epochs_name = HYPERPARAMETER_NAMES[style]
    multiplier = float(cfg.train.learning_rate_multiplier)
    # Examples per optimizer step, as a local run computes it (base x multiplier).
    batch = int(cfg.model.base_batch_size) * int(cfg.train.batch_size_multiplier)
    epochs = resolve_epochs(cfg.train.epochs, n_examples)
    lr = multiplier if style == "portal" else float(cfg.model.base_learning_rate) * multiplier
    return {lr_name: _num(lr), batch_name: str(batch), epochs_name: str(epochs)}


def _num(x: float) -> str:
    return repr(float(x)) if abs(x) >= 1e-4 else f"{x:.3e}"


def model_name_from_uri(uri: str) -> str:
    m = re.search(r"/models/([^/]+)", uri)
    return m.group(1) if m else uri.rsplit("/", 1)[-1]


def model_uri(settings) -> str:
    """backend.model as a URI: a bare name (`Phi-4-mini-instruct`) is its registry's /labels/latest."""
    model = str(settings.model)
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model):
        entry = (settings.models or {}).get(model)
        registry = entry.registry if entry is not None else "azureml"
        return f"azureml://registries/{registry}/models/{model}/labels/latest"
    return model


def _day(settings, name: str, field: str) -> Optional[date]:
    value = getattr(settings.models[name], field)
    if value in (None, ""):
        return None
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise PhituneError(f"backend.models.{name}.{field}={value}: expected a date YYYY-MM-DD "
                           "(conf/backend/foundry.yaml)") from None


def check_lifecycle(settings, today: Optional[date] = None) -> None:
    """Refuse a base model whose Foundry fine-tuning is retired (naming its replacement); warn when deprecated.

    The dates are the table `backend.models` (conf/backend/foundry.yaml), checked against
    Azure's model registry and Microsoft's retirement schedule on `backend.models_checked`.
    """
    name = model_name_from_uri(settings.model)
    today = today or date.today()
    checked = f" (table checked {settings.models_checked})" if settings.models_checked else ""
    if name not in (settings.models or {}):
        print(f"note: backend.model={name} is not in backend.models{checked}; sent as given, Azure decides whether "
              "it can be fine-tuned", file=sys.stderr)
        return
    entry = settings.models[name]
    retired, deprecated = _day(settings, name, "finetune_retirement"), _day(settings, name, "finetune_deprecation")
    instead = f"backend.model={entry.replacement}" if entry.replacement else "another backend.model"
    own = f"backend=azureml model={entry.azureml_model}" if entry.azureml_model else "backend=azureml"
    if retired is not None and retired <= today:
        raise PhituneError(f"backend.model={name}: Azure retired fine-tuning of this model on {retired}; use {own} "
                           f"to fine-tune it with phitune's own training on Azure ML compute, or {instead}{checked}")
    if deprecated is not None and deprecated <= today:
        until = f"; it retires on {retired}" if retired else ""
        print(f"warning: backend.model={name}: Azure deprecated fine-tuning of this model on {deprecated}{until}; "
              f"move to {instead}{checked}", file=sys.stderr)


def output_model_name(cfg, settings) -> str:
    if settings.output_model_name:
        return settings.output_model_name
    exp = settings.experiment or str(cfg.tracking.experiment)
    # Azure asset names: letters, digits, - and _ ; at most 255 characters.
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{model_name_from_uri(settings.model)}-{exp}-ft")[:255]


def data_files(cfg, prepared, work_dir: Path) -> "tuple[str, Optional[str]]":
    """(train path, validation path or None) to upload: the user's files, or the automatic split written out."""
    splits = prepared[0]
    mode = splits.mode
    if mode == "file":
        return str(cfg.data.train_file), str(cfg.data.validation_file)
    if mode == "none":
        return str(cfg.data.train_file), None
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, examples in (("train", splits.train), ("valid", splits.valid)):
        path = work_dir / f"{part}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps({"messages": ex.messages}, ensure_ascii=False) + "\n")
        paths.append(str(path))
    print(f"data.validation=auto: split {len(splits.train)} training / {len(splits.valid)} validation examples "
          f"into {work_dir}", file=sys.stderr)
    return paths[0], paths[1]


def build_finetuning_job(cfg, settings, training_data: str, validation_data: Optional[str], hyper: dict,
                         model: Optional[str] = None):
    """The CustomModelFineTuningJob (offline). Data arguments: asset ids, URIs or local paths."""
    from azure.ai.ml.finetuning import create_finetuning_job

    from phitune.azure.command_job import job_tags
    from phitune.azure.redact import redact_tree

    job = create_finetuning_job(
        model=model or settings.model,
        task=settings.task,
        training_data=training_data,
        # azure-ai-ml 1.x leaves its validation input unbound when validation_data is None;
        # pass the training data and drop it below (the portal's "no validation data").
        validation_data=validation_data or training_data,
        hyperparameters=hyper,
        output_model_name_prefix=output_model_name(cfg, settings),
        experiment_name=settings.experiment or str(cfg.tracking.experiment),
        display_name=settings.display_name,
        tags=job_tags(cfg, settings, "finetune"),
        job_tier=settings.job_tier,
    )
    if validation_data is None:
        job.validation_data = None
    job.tags = redact_tree(dict(job.tags or {}))
    return job


def dump_finetuning_job(job, path: Path) -> Path:
    from phitune.azure.command_job import dump_job

    return dump_job(job, path)


def _content_version(path: str) -> str:
    """A data-asset version from the file's content: the same file maps to the same version (sha256, 16 hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def upload_data(client, path: str, name: str) -> str:
    """A uri_file data asset for a local file (reused when this content was uploaded before); its id."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Data
    from azure.core.exceptions import ResourceNotFoundError

    version = _content_version(path)
    try:
        asset = client.data.get(name=name, version=version)
        print(f"data asset {name}:{version} already in the workspace; not uploaded again", file=sys.stderr)
    except ResourceNotFoundError:
        asset = client.data.create_or_update(Data(name=name, version=version, path=path, type=AssetTypes.URI_FILE,
                                                  description="phitune fine-tuning data (validated locally)"))
        print(f"uploaded {path} as data asset {name}:{version}", file=sys.stderr)
    return asset.id


def resolve_model(settings, credential=None, transport=None) -> str:
    """A registry model URI with /labels/<label> resolved to its version id (the job needs a version)."""
    m = re.match(r"azureml://registries/([^/]+)/models/([^/]+)/labels/([^/]+)$", settings.model)
    if not m:
        return settings.model
    from azure.ai.ml import MLClient

    from phitune.azure.workspace import default_credential

    registry, name, label = m.groups()
    kwargs = {"transport": transport} if transport is not None else {}
    reg = MLClient(credential or default_credential(), registry_name=registry, show_progress=False,
                   enable_telemetry=False, **kwargs)
    model = reg.models.get(name=name, label=label)
    print(f"base model {name}@{label} = version {model.version}", file=sys.stderr)
    return model.id


def registered_output(job) -> Optional[str]:
    """The name of the model the fine-tuning job registers (its `registered_model` output)."""
    outputs = getattr(job, "outputs", None) or {}
    out = outputs.get("registered_model") if hasattr(outputs, "get") else None
    if out is None:
        return None
    return getattr(out, "name", None) or (out.get("name") if isinstance(out, dict) else None)


def azure_model_uri(settings, name: str, version: str) -> str:
    return (f"azureml://subscriptions/{settings.subscription_id}/resourceGroups/{settings.resource_group}"
            f"/workspaces/{settings.workspace}/models/{name}/versions/{version}")


def link_model(cfg, settings, model, job_name: str, tracking_uri: Optional[str] = None):
    """Register the Azure model in the local MLflow registry; returns the ModelVersion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from phitune.azure.redact import redact_tree

    uri = tracking_uri or str(cfg.tracking.uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.create_registered_model(model.name, tags={"phitune.source": "azure-foundry"},
                                       description="fine-tuned with Azure AI Foundry serverless fine-tuning")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    tags = redact_tree({"azure_model_id": model.id, "azure_job_name": job_name,
                        "azure_model_version": str(model.version), "azure_base_model": settings.model,
                        "phitune.target": "azureml"})
    version = client.create_model_version(model.name, source=azure_model_uri(settings, model.name, model.version),
                                          tags=tags, description=f"Azure AI Foundry fine-tuning job {job_name}")
    print(f"linked Azure model {model.name}:{model.version} as MLflow model version "
          f"models:/{model.name}/{version.version}")
    return version


def submit_finetuning(cfg, settings, *, credential=None, transport=None, sleep=None):
    """Validate, estimate, (upload, submit, follow, link); returns the final job, or None on a dry run."""
    from phitune.azure import cost
    from phitune.azure.workspace import azure_errors

    settings.model = model_uri(settings)
    check_lifecycle(settings)  # before the workspace, the tokenizer or any request
    if not settings.dry_run:
        from phitune.azure.settings import require_workspace

        require_workspace(settings, "foundry")
    if getattr(cfg.model, "builtin", None):
        print(f"note: model={cfg.model.name} locally; Foundry fine-tunes {model_name_from_uri(settings.model)}; "
              f"batch size and learning rate are derived from model={cfg.model.name}'s base values", file=sys.stderr)
    tokens, _, prepared = cost.preflight(cfg, settings, trials=1)
    n_examples = tokens.n_examples if tokens else 0
    hyper = hyperparameters(cfg, settings, n_examples)
    print("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hyper.items()))
    out_dir = Path(settings.output_dir)
    train_path, valid_path = data_files(cfg, prepared, out_dir / "foundry-data")
    if settings.dry_run:
        job = build_finetuning_job(cfg, settings, str(Path(train_path).resolve()),
                                   str(Path(valid_path).resolve()) if valid_path else None, hyper)
        path = dump_finetuning_job(job, out_dir / "finetuning_job.yaml")
        print(f"dry run: wrote {path} (submit it with: az ml job create -f {path}); nothing was submitted")
        return None

    with azure_errors("backend=foundry"):
        return _submit_and_follow(cfg, settings, train_path, valid_path, hyper, credential, transport, sleep)


def _submit_and_follow(cfg, settings, train_path, valid_path, hyper, credential, transport, sleep):
    from phitune.azure.workspace import follow, job_status, ml_client, raise_if_failed, studio_url

    client = ml_client(settings, credential=credential, transport=transport)
    prefix = settings.data_name_prefix or re.sub(r"[^A-Za-z0-9_-]", "-", settings.experiment or str(cfg.tracking.experiment))
    train_id = upload_data(client, train_path, f"{prefix}-train")
    valid_id = upload_data(client, valid_path, f"{prefix}-valid") if valid_path else None
    model = resolve_model(settings, credential=credential or client._credential, transport=transport)
    job = build_finetuning_job(cfg, settings, train_id, valid_id, hyper, model=model)
    created = client.jobs.create_or_update(job)
    print(f"submitted Foundry fine-tuning job {created.name}: {studio_url(created) or '(no studio link returned)'}")
    if not settings.follow:
        return created
    final = follow(client, created.name, settings.poll_seconds, sleep=sleep or time.sleep)
    raise_if_failed(final)
    if job_status(final) == "Completed" and settings.link_model:
        name = registered_output(final) or registered_output(created) or output_model_name(cfg, settings)
        azure_model = client.models.get(name=name, label="latest")
        link_model(cfg, settings, azure_model, created.name)
    return final
