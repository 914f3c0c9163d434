"""The `backend=azureml` and `backend=foundry` config groups as typed dataclasses.

`PhituneConfig.backend` is `Any` (each backend validates its own fields), so
these are applied here, before anything is built: a typo such as
`backend.instance_typ=...` fails with the list of known fields instead of being
ignored while a GPU bills.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from phitune.errors import PhituneError


@dataclass
class WorkspaceRef:
    subscription_id: Optional[str] = None
    resource_group: Optional[str] = None
    workspace: Optional[str] = None  # Azure ML workspace, or the Azure AI Foundry project


@dataclass
class CostSettings:
    # Price of one node (one VM of instance_type) for one hour, in the account's currency.
    price_per_node_hour: Optional[float] = None
    # Price per 1,000 billed training tokens (serverless fine-tuning is billed this way).
    price_per_1k_tokens: Optional[float] = None
    # Node-hours are unknown before a run; either give the hours per run, or a
    # measured training throughput (tokens/s on one node) to derive them.
    estimated_hours: Optional[float] = None
    tokens_per_second: Optional[float] = None
    max_cost: Optional[float] = None  # refuse a submission whose estimate is higher


class Tier(str, Enum):
    """Which VMs an Azure ML job runs on."""

    dedicated = "dedicated"  # VMs kept until the job ends
    low_priority = "low_priority"  # Azure's spare capacity, cheaper; may be preempted (the job then restarts)


@dataclass
class AzureMLBackend(WorkspaceRef, CostSettings):
    name: str = "azureml"
    # Compute cluster name; None = serverless compute sized by instance_type.
    compute: Optional[str] = None
    instance_type: Optional[str] = "Standard_NC24ads_A100_v4"  # 1x A100 80 GB, 24 vCPU
    instance_count: int = 1
    # A registered environment ("azureml:phitune-env:3") wins over image + conda_file.
    environment: Optional[str] = None
    image: str = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04:latest"
    conda_file: Optional[str] = None  # None = src/phitune/azure/conda.yaml
    experiment: Optional[str] = None  # None = tracking.experiment
    display_name: Optional[str] = None
    code_dir: Optional[str] = None  # None = the project root (where train.py is)
    timeout_minutes: Optional[int] = None  # per command job / per sweep trial
    # low_priority: serverless Spot VMs (or a low-priority cluster); train.output_dir is a job
    # output on the datastore and resume=true is passed, so a restarted job continues from
    # its last checkpoint.
    tier: Tier = Tier.dedicated
    checkpoint_path: Optional[str] = None  # datastore folder for the checkpoints; None = the job's own output
    dry_run: bool = False
    output_dir: str = "outputs/azure"  # dry-run YAML lands here
    follow: bool = True
    poll_seconds: float = 30.0
    tags: dict = field(default_factory=dict)


@dataclass
class FoundryModel:
    """One row of the table of base models Foundry fine-tunes (conf/backend/foundry.yaml `models`)."""

    registry: str = "azureml"  # the Azure ML registry that holds it
    finetune_deprecation: Optional[str] = None  # YYYY-MM-DD: from then on a warning
    finetune_retirement: Optional[str] = None  # YYYY-MM-DD: from then on Foundry fine-tunes it no more
    replacement: Optional[str] = None  # a model of this table that Foundry still fine-tunes
    azureml_model: Optional[str] = None  # conf/model/ name for backend=azureml (phitune's own training)
    source: Optional[str] = None  # where the dates come from


@dataclass
class FoundryBackend(WorkspaceRef, CostSettings):
    name: str = "foundry"
    # A registry URI, or a name of the models table (expanded to its registry's /labels/latest).
    model: str = "azureml://registries/azureml/models/Phi-4-mini-instruct/labels/latest"
    task: str = "ChatCompletion"
    # "portal": learning_rate_multiplier / batch_size / n_epochs (the Foundry wizard's names)
    # "trainer": learning_rate / per_device_train_batch_size / num_train_epochs (the SDK samples' names)
    hyperparameter_names: str = "portal"
    output_model_name: Optional[str] = None  # None = <base model>-<experiment>-ft
    data_name_prefix: Optional[str] = None  # data assets: <prefix>-train / -valid; None = experiment
    experiment: Optional[str] = None
    display_name: Optional[str] = None
    job_tier: Optional[str] = None
    dry_run: bool = False
    output_dir: str = "outputs/azure"
    follow: bool = True
    poll_seconds: float = 60.0
    link_model: bool = True  # register the result in the local MLflow registry
    tags: dict = field(default_factory=dict)
    models: Dict[str, FoundryModel] = field(default_factory=dict)  # name -> fine-tuning lifecycle
    models_checked: Optional[str] = None  # YYYY-MM-DD the table was last checked against its sources


_SCHEMAS = {"azureml": AzureMLBackend, "foundry": FoundryBackend}


def backend_settings(backend_cfg) -> Any:
    """The backend node merged onto its dataclass; PhituneError with the known fields on a typo."""
    name = str(OmegaConf.select(backend_cfg, "name") if OmegaConf.is_config(backend_cfg) else backend_cfg.get("name"))
    schema = _SCHEMAS.get(name)
    if schema is None:
        raise PhituneError(f"backend.name={name!r}: Azure backends are {', '.join(_SCHEMAS)}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), backend_cfg)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        known = ", ".join(sorted(schema.__dataclass_fields__))
        detail = " ".join(str(exc).split("\n")[0].split())
        where = f"backend.{exc.full_key}: " if getattr(exc, "full_key", None) else ""
        raise PhituneError(f"backend={name}: {where}{detail} (fields: {known})") from None


def require_workspace(s: WorkspaceRef, backend: str) -> None:
    missing = [k for k in ("subscription_id", "resource_group", "workspace") if not getattr(s, k)]
    if missing:
        sets = " ".join(f"backend.{k}=..." for k in missing)
        raise PhituneError(f"backend={backend}: {', '.join(missing)} not set; add {sets} "
                           "(or AZURE_SUBSCRIPTION_ID / AZURE_RESOURCE_GROUP / AZUREML_WORKSPACE_NAME)")
