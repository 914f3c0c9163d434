"""`python train.py backend=azureml ...` as one Azure ML command job.

The remote job runs the same entry point with the same overrides:

    python train.py <the user's overrides> backend=local \
        data.train_file=${{inputs.train_file}} data.validation_file=${{inputs.validation_file}}

- code: the project root (train.py, conf/, src/, ...), uploaded by Azure ML as a
  code snapshot; `.amlignore` at the root keeps .venv, mlruns, outputs,
  checkpoints, multirun and .git out of it.
- data: the training/validation files become `uri_file` inputs (uploaded to the
  workspace's default datastore), so a local path works on the remote machine.
- environment: a registered environment, or `image` + a conda file (phitune's
  src/phitune/azure/conda.yaml by default, with azureml-mlflow for tracking).
- tracking: Azure ML opens an MLflow run for the job and sets
  MLFLOW_TRACKING_URI / MLFLOW_RUN_ID; phitune.tracking.context.azure_run_context()
  makes the remote trainer log into that run. Local-only tracking overrides
  (tracking.uri, tracking.artifact_root) are not forwarded.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Iterable, Optional

from phitune.azure.redact import check_overrides, redact_tree, safe_env
from phitune.errors import PhituneError
from phitune.redact import override_key

CONDA_FILE = Path(__file__).with_name("conda.yaml")
ENTRY = "python train.py"

# Override keys that configure this submission, not the training run: they must
# not reach the remote side (backend=azureml there would submit again, forever).
# `trial.*`, `tracking.parent_run_id` and `sweep=NAME` (a sweeps/ file: hydra.sweeper
# settings) belong to the local Optuna sweeper; a remote trial gets its values bound.
LOCAL_ONLY = ("backend", "hydra", "trial", "sweep", "tracking.uri", "tracking.artifact_root",
              "tracking.parent_run_id")

# Local paths that become job inputs (key in the config -> input name), so the remote
# machine gets the files: the data, and a local model folder (model.path) if one is used.
DATA_INPUTS = {"data.train_file": "train_file", "data.validation_file": "validation_file", "model.path": "model_path"}


# backend.tier=low_priority: the job output that holds train.output_dir (its checkpoints).
CHECKPOINTS = "checkpoints"


def _is_local_only(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in LOCAL_ONLY)


def remote_overrides(overrides: Iterable[str], replaced: Iterable[str] = ()) -> list[str]:
    """The user's overrides minus submission-only keys and the keys phitune sets itself."""
    replaced = set(replaced)
    out = []
    for ov in check_overrides(list(overrides)):
        key = override_key(ov)
        if _is_local_only(key) or key in replaced:
            continue
        out.append(ov)
    return out


def shell_join(args: Iterable[str]) -> str:
    """Quote for the job's shell, but leave Azure's ${{...}} bindings readable.

    Azure ML substitutes ${{inputs.x}} / ${{search_space.x}} textually before the
    shell runs, so they stay valid inside single quotes too; quoting is needed for
    overrides such as `train.lora.target_modules=[q,v]` (brackets are globs).
    """
    return " ".join(a if _is_plain(a) else shlex.quote(a) for a in args)


def _is_plain(arg: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_.+~/=:@,-]+|[A-Za-z0-9_.+~/:-]+=\$\{\{(inputs|outputs|search_space)\.[A-Za-z0-9_]+\}\}",
                        arg) is not None


def project_root(code_dir: Optional[str] = None) -> Path:
    """The folder uploaded as the job's code: backend.code_dir, else where train.py and conf/ live."""
    if code_dir:
        root = Path(code_dir).expanduser().resolve()
    else:
        from phitune.confdir import conf_dir

        root = conf_dir().resolve().parent
        if not (root / "train.py").is_file():
            root = Path.cwd().resolve()
    if not (root / "train.py").is_file():
        raise PhituneError(f"{root}: no train.py here; set backend.code_dir=DIR to the phitune project folder")
    return root


def data_inputs(cfg) -> dict:
    """{input name: local path or URI} for the files the run reads (data, and model.path if set)."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        train = cfg.data.train_file
    except MissingMandatoryValue:
        raise PhituneError("data.train_file is not set: add data.train_file=PATH to the command line") from None
    files = {"train_file": str(train)}
    mode = str(cfg.data.get("validation", "file"))
    if mode == "file" and cfg.data.get("validation_file"):
        files["validation_file"] = str(cfg.data.validation_file)
    if cfg.model.get("path"):
        files["model_path"] = str(cfg.model.path)
    return files


def is_remote_uri(path: str) -> bool:
    return path.startswith(("azureml:", "https://", "http://", "wasbs://", "abfss://", "adl://"))


def _input(path: str, name: str = "train_file"):
    from azure.ai.ml import Input

    kind = "uri_folder" if name == "model_path" else "uri_file"
    if not is_remote_uri(path):
        p = Path(path).expanduser()
        if not (p.is_dir() if kind == "uri_folder" else p.is_file()):
            what = "folder (model.path)" if kind == "uri_folder" else "file (data for the Azure job)"
            raise PhituneError(f"{path}: no such {what}")
        path = str(p.resolve())
    return Input(type=kind, path=path)


def environment(settings):
    """A registered environment id, or an Environment from image + conda file."""
    if settings.environment:
        return settings.environment
    from azure.ai.ml.entities import Environment

    conda = Path(settings.conda_file).expanduser() if settings.conda_file else CONDA_FILE
    if not conda.is_file():
        raise PhituneError(f"backend.conda_file={conda}: no such file")
    return Environment(image=settings.image, conda_file=str(conda.resolve()),
                       description="phitune training environment (image + conda file)")


def experiment_name(cfg, settings) -> str:
    return settings.experiment or str(cfg.tracking.experiment)


def job_tags(cfg, settings, kind: str) -> dict:
    tags = {"phitune.backend": settings.name, "phitune.kind": kind, "phitune.model": str(cfg.model.name)}
    tags.update({str(k): str(v) for k, v in (settings.tags or {}).items()})
    return redact_tree(tags)


def preemptible(settings) -> "tuple[dict, list, object]":
    """(job outputs, overrides, queue settings) for backend.tier; nothing extra when dedicated.

    low_priority: train.output_dir is a uri_folder output mounted read-write, so checkpoints
    land on the datastore as they are written, and resume=true makes a job restarted after a
    preemption continue from the last complete checkpoint in that folder (with none yet, it
    starts from the beginning). backend.checkpoint_path pins the folder, so a resubmitted job
    resumes too. Serverless compute takes the tier per job (queue_settings job_tier spot;
    standard = dedicated, Azure's default); a cluster's VMs are low priority or dedicated by
    the cluster's own tier.
    """
    from phitune.azure.settings import Tier

    if Tier(settings.tier) is Tier.dedicated:
        return {}, [], None
    from azure.ai.ml import Output
    from azure.ai.ml.entities import QueueSettings

    out = Output(type="uri_folder", mode="rw_mount", path=settings.checkpoint_path or None)
    args = [f"train.output_dir=${{{{outputs.{CHECKPOINTS}}}}}", "resume=true"]
    return {CHECKPOINTS: out}, args, (None if settings.compute else QueueSettings(job_tier="spot"))


def tier_note(settings) -> Optional[str]:
    """One line for backend.tier=low_priority on a named cluster, whose own tier decides."""
    from phitune.azure.settings import Tier

    if Tier(settings.tier) is Tier.low_priority and settings.compute:
        return (f"note: backend.tier=low_priority on backend.compute={settings.compute}: a cluster is low priority "
                "if it was created so (az ml compute create --tier low_priority); the job checkpoints to its "
                "outputs and resumes either way")
    return None


def remote_command(overrides: Iterable[str], inputs: dict, extra: Iterable[str] = ()) -> str:
    """`python train.py ...` for the remote side; `inputs` are the data inputs' names."""
    bindings = [f"{key}=${{{{inputs.{name}}}}}" for key, name in DATA_INPUTS.items() if name in inputs]
    fixed = remote_overrides(overrides, replaced={*DATA_INPUTS, *(override_key(a) for a in extra)})
    return f"{ENTRY} {shell_join([*fixed, 'backend=local', *bindings, *extra])}".strip()


def build_command_job(cfg, overrides: list[str], settings, code_dir: Optional[str] = None):
    """The azure.ai.ml Command for one training run (built offline; nothing is sent)."""
    from azure.ai.ml import PyTorchDistribution, command

    inputs = {name: _input(path, name) for name, path in data_inputs(cfg).items()}
    root = project_root(code_dir or settings.code_dir)
    outputs, tier_args, queue = preemptible(settings)
    kwargs = {"outputs": outputs, "queue_settings": queue} if outputs else {}
    if settings.instance_count > 1:
        # One process per node; the trainer reads the torchrun-style env Azure sets (RANK, WORLD_SIZE, ...).
        kwargs["distribution"] = PyTorchDistribution(process_count_per_instance=1)
    job = command(
        command=remote_command(overrides, inputs, extra=tier_args),
        code=str(root),
        inputs=inputs,
        environment=environment(settings),
        # PYTHONPATH=src: the job runs phitune from the uploaded code, not an installed wheel.
        environment_variables=safe_env({"PYTHONPATH": "src"}),
        compute=settings.compute,
        instance_type=settings.instance_type,
        instance_count=settings.instance_count,
        experiment_name=experiment_name(cfg, settings),
        display_name=settings.display_name,
        description="phitune fine-tune: python train.py with the same Hydra overrides",
        tags=job_tags(cfg, settings, "train"),
        timeout=int(settings.timeout_minutes) * 60 if settings.timeout_minutes else None,  # seconds
        **kwargs,
    )
    return job


def dump_job(job, path: Path) -> Path:
    """Write YAML that `az ml job create -f` and azure.ai.ml.load_job accept; secrets masked."""
    from phitune.azure.redact import assert_clean_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entity = job._to_job() if hasattr(job, "_to_job") else job
    entity.dump(path)
    _relativize_paths(path)
    assert_clean_file(path)
    return path


def _relativize_paths(path: Path) -> None:
    """Local paths in the dumped YAML, relative to the YAML's folder (where az ml resolves them).

    azure-ai-ml 1.x dumps a local input path as `azureml:/abs/path` (its path field
    tries the asset-id form first and that accepts any string), which `az ml job
    create` would read as a data asset named "/abs/path". Undo that for paths that
    exist on this machine, and make absolute ones relative so the folder can move.
    """
    import os

    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    base = path.parent.resolve()

    def fix(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("code", "path", "conda_file") and isinstance(v, str):
                    local = v[len("azureml:"):] if v.startswith("azureml:/") else v
                    if os.path.isabs(local) and Path(local).exists():
                        node[k] = os.path.relpath(local, base)
                else:
                    fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)

    fix(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
