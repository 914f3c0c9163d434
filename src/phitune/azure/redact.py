"""Keep credentials and keys out of what phitune writes or sends for Azure.

Subscription ids, resource groups and workspace names identify resources; they
are not secrets and stay readable. Keys, client secrets, SAS tokens and API keys
are: they never enter a job's command, environment variables, tags, written
YAML, printed output or MLflow. The masking itself (secret-named keys, URL
passwords, values of secret environment variables) is phitune.redact's; this
module adds what only Azure needs: refusing secrets in a remote job's overrides
and environment, a last net over written files, and a filter for azure's loggers.

A secret in a command-line override is refused rather than masked: a masked
override would change what the remote job runs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

from phitune.errors import PhituneError
from phitune.redact import MASK, is_secret_key, override_key, redact_text, redact_tree, secret_values

__all__ = ["MASK", "is_secret_key", "secret_values", "redact_text", "redact_tree", "check_overrides",
           "safe_env", "assert_clean_file", "RedactingFilter", "install_log_filter"]


def check_overrides(overrides: Iterable[str], secrets: Optional[set] = None) -> list[str]:
    """The overrides unchanged, or PhituneError when one carries a secret.

    The remote job runs these overrides verbatim, so they end up in the job's
    command, its YAML and the workspace's job history.
    """
    secrets = secret_values() if secrets is None else secrets
    out = []
    for ov in overrides:
        key = override_key(ov)
        value = ov.split("=", 1)[1] if "=" in ov else ""
        if (is_secret_key(key) and value) or any(s in ov for s in secrets):
            raise PhituneError(
                f"override {key}=...: looks like a credential or key; it would be written into the Azure job's "
                "command and history. Give secrets to the job through the workspace's Key Vault or a "
                "workspace connection instead, never on the command line."
            )
        out.append(ov)
    return out


def safe_env(env: dict, secrets: Optional[set] = None) -> dict:
    """Environment variables for a remote job, or PhituneError if one is (or names) a secret."""
    secrets = secret_values() if secrets is None else secrets
    for k, v in env.items():
        if is_secret_key(k) or any(s in str(v) for s in secrets):
            raise PhituneError(f"environment variable {k} for the Azure job looks like a secret; not sent")
    return dict(env)


def assert_clean_file(path, secrets: Optional[set] = None) -> None:
    """Rewrite a file phitune wrote with any secret value masked (a last net behind the first two)."""
    secrets = secret_values() if secrets is None else secrets
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    clean = redact_text(text, secrets)
    if clean != text:
        p.write_text(clean, encoding="utf-8")


class RedactingFilter(logging.Filter):
    """Masks secret values in log records (azure-core logs request URLs, which may carry a SAS)."""

    def __init__(self, secrets: Optional[set] = None):
        super().__init__()
        self.secrets = secret_values() if secrets is None else secrets

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string is the logger's problem, not a leak
            return True
        clean = redact_text(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_FILTERED_LOGGERS = ("azure", "azure.core.pipeline.policies.http_logging_policy", "azure.identity", "phitune")


def install_log_filter(secrets: Optional[set] = None) -> RedactingFilter:
    """Attach one RedactingFilter to the azure and phitune loggers and to the root handlers.

    Also quiets azure-ai-ml's "This is an experimental class" notices: phitune uses the
    experimental fine-tuning API on purpose (docs/azure.md says so), and a dozen such
    lines would bury the cost estimate and the job's status.
    """
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    flt = RedactingFilter(secrets)
    for name in _FILTERED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(flt)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt
