"""MLClient for the configured workspace, and following a job until it ends.

Credentials: DefaultAzureCredential (az login, managed identity, workload
identity, or AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET). phitune
never reads, stores or prints a secret itself. Tests pass their own credential
and an HTTP transport (azure-core's `transport=` keyword, handed by MLClient to
every service client), so no request leaves the process.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional

from phitune.errors import PhituneError

# Azure ML job states (JobStatus in the REST API) after which nothing changes.
TERMINAL = {"Completed", "Failed", "Canceled", "NotResponding", "Paused"}
FAILED = {"Failed", "Canceled", "NotResponding"}


def require_sdk() -> None:
    try:
        import azure.ai.ml  # noqa: F401
        import azure.identity  # noqa: F401
    except ImportError:
        raise PhituneError("the Azure backends need azure-ai-ml and azure-identity: pip install 'phitune[azure]'") from None


def default_credential():
    """DefaultAzureCredential, the chain `az ml` uses too."""
    require_sdk()
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def ml_client(settings, credential=None, transport=None, **kwargs):
    """MLClient(credential, subscription, resource group, workspace); `transport` for offline tests."""
    require_sdk()
    from azure.ai.ml import MLClient

    from phitune.azure.settings import require_workspace

    require_workspace(settings, settings.name)
    if transport is not None:
        kwargs["transport"] = transport
    # No progress bars or telemetry from the SDK: phitune prints its own lines.
    kwargs.setdefault("show_progress", False)
    kwargs.setdefault("enable_telemetry", False)
    return MLClient(credential or default_credential(), subscription_id=settings.subscription_id,
                    resource_group_name=settings.resource_group, workspace_name=settings.workspace, **kwargs)


def job_status(job) -> str:
    """"Completed", "Running", ...: the SDK returns a str or a JobStatus enum depending on the job type."""
    status = getattr(job, "status", None)
    return str(getattr(status, "value", status) or "")


def studio_url(job) -> Optional[str]:
    url = getattr(job, "studio_url", None)
    if url:
        return url
    services = getattr(job, "services", None) or {}
    studio = services.get("Studio") if isinstance(services, dict) else None
    return getattr(studio, "endpoint", None) if studio is not None else None


def follow(client, job_name: str, poll_seconds: float = 30.0, timeout_s: Optional[float] = None,
           sleep: Callable[[float], None] = time.sleep, out=None):
    """Poll the job until a terminal state, printing each change; returns the final job.

    Polling `jobs.get` (one small ARM GET per poll) rather than `jobs.stream`: the
    stream also tails logs from the run-history service, which needs a second
    endpoint and prints every line of the remote job into this terminal.
    """
    out = out or sys.stderr
    started, last = time.monotonic(), None
    while True:
        job = client.jobs.get(job_name)
        status = job_status(job)
        if status != last:
            print(f"azure job {job_name}: {status}", file=out, flush=True)
            last = status
        if status in TERMINAL:
            return job
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            print(f"azure job {job_name}: still {status} after {timeout_s:.0f} s; stopped following "
                  "(the job keeps running)", file=out)
            return job
        sleep(poll_seconds)


def raise_if_failed(job) -> None:
    status = job_status(job)
    if status in FAILED:
        url = studio_url(job)
        raise PhituneError(f"azure job {job.name} ended {status}" + (f"; logs: {url}" if url else ""))


def _one_line(exc: BaseException, limit: int = 400) -> str:
    from phitune.azure.redact import redact_text

    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return redact_text(" ".join(str(text).split()))[:limit]


@contextmanager
def azure_errors(what: str):
    """Azure SDK failures (sign-in, HTTP errors, network, SDK validation) as one-line PhituneErrors."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    try:
        from azure.ai.ml.exceptions import MlException
    except ImportError:  # pragma: no cover
        MlException = ()  # noqa: N806
    try:
        yield
    except PhituneError:
        raise
    except ClientAuthenticationError as exc:
        raise PhituneError(f"{what}: Azure sign-in failed: {_one_line(exc, 300)}. Sign in with `az login`, or set "
                           "AZURE_TENANT_ID / AZURE_CLIENT_ID / AZURE_CLIENT_SECRET for a service principal") from None
    except HttpResponseError as exc:
        status = getattr(exc, "status_code", None) or "an error"
        raise PhituneError(f"{what}: Azure answered {status}: {_one_line(exc)}") from None
    except ServiceRequestError as exc:
        raise PhituneError(f"{what}: cannot reach Azure ({_one_line(exc, 200)})") from None
    except MlException as exc:
        raise PhituneError(f"{what}: {_one_line(exc)}") from None
