"""Keep secrets out of params, tags, artifacts and logs.

Two nets: config keys that name a secret, and any value equal to the value of an
environment variable whose name says it holds one (API keys, client secrets, SAS).
"""
from __future__ import annotations

import os
import re

MASK = "***"
_SECRET_KEY = re.compile(r"(^|_)(key|api_key|secret|password|passwd|token|credential|credentials|sas|connection_string)$", re.I)
_SECRET_ENV = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SAS|CONNECTION_STRING)", re.I)


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_KEY.search(name.rsplit(".", 1)[-1]))


def secret_values() -> set[str]:
    # Values shorter than 8 characters are not treated as secrets (e.g. "1", "true").
    return {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and v and len(v) >= 8}


def redact_text(text: str, secrets: set[str] | None = None) -> str:
    for value in sorted(secrets if secrets is not None else secret_values(), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def redact_mapping(flat: dict, secrets: set[str] | None = None) -> dict:
    secrets = secret_values() if secrets is None else secrets
    out = {}
    for key, value in flat.items():
        if is_secret_key(key) and value not in (None, ""):
            out[key] = MASK
        else:
            out[key] = redact_text(str(value), secrets) if isinstance(value, str) else value
    return out
