"""`python train.py backend=azureml|foundry ...`: the recipe hands the run over here.

    submit(cfg, overrides) -> None

1. the backend's settings are checked (typos fail here);
2. the data is validated locally and its billed tokens counted; the cost is
   estimated and `backend.max_cost` enforced (phitune.azure.cost);
3. the job is built offline with azure-ai-ml;
4. `backend.dry_run=true`: its YAML is written to `backend.output_dir` and
   nothing is sent; otherwise it is submitted with MLClient +
   DefaultAzureCredential, its studio URL printed, and (backend.follow) its
   status followed until it ends.

Returns None: the objective of an Azure run lives in Azure, not in this process.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from phitune.errors import PhituneError


def submit(cfg, overrides: list[str], *, credential=None, transport=None, sleep=None) -> Optional[float]:
    """Run `cfg` on its Azure backend. `credential`/`transport`/`sleep` are for offline tests."""
    from phitune.azure.redact import install_log_filter
    from phitune.azure.settings import backend_settings
    from phitune.azure.workspace import require_sdk

    require_sdk()
    install_log_filter()
    settings = backend_settings(cfg.backend)
    if settings.name == "foundry":
        from phitune.azure.finetune_job import submit_finetuning

        submit_finetuning(cfg, settings, credential=credential, transport=transport, sleep=sleep)
        return None
    if settings.name == "azureml":
        submit_command(cfg, list(overrides or []), settings, credential=credential, transport=transport, sleep=sleep)
        return None
    raise PhituneError(f"backend={settings.name}: not an Azure backend")


def submit_command(cfg, overrides: list[str], settings, *, credential=None, transport=None, sleep=None):
    """One training run as an Azure ML command job; returns the created job (None on a dry run)."""
    from phitune.azure import cost
    from phitune.azure.command_job import build_command_job, data_inputs, dump_job, is_remote_uri, tier_note
    from phitune.azure.workspace import azure_errors, follow, ml_client, raise_if_failed, studio_url

    from phitune.azure.settings import require_workspace

    if not settings.dry_run:
        require_workspace(settings, "azureml")  # before minutes of tokenizing
    # Build first: a bad override or missing file is reported before the data is tokenized.
    job = build_command_job(cfg, overrides, settings)
    if tier_note(settings):
        print(tier_note(settings), file=sys.stderr)
    remote = any(is_remote_uri(p) for k, p in data_inputs(cfg).items() if k != "model_path")
    cost.preflight(cfg, settings, trials=1, remote_data=remote)
    if settings.dry_run:
        path = dump_job(job, Path(settings.output_dir) / "job.yaml")
        print(f"dry run: wrote {path} (submit it with: az ml job create -f {path}); nothing was submitted")
        return None
    with azure_errors("backend=azureml"):
        client = ml_client(settings, credential=credential, transport=transport)
        created = client.jobs.create_or_update(job)
        print(f"submitted Azure ML job {created.name}: {studio_url(created) or '(no studio link returned)'}")
        if settings.follow:
            final = follow(client, created.name, settings.poll_seconds, sleep=sleep or time.sleep)
            raise_if_failed(final)
            return final
    return created
