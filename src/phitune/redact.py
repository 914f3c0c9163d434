"""One redaction for everything phitune writes: MLflow params, tags and artifacts, logs, job YAML.

Three nets, each applied wherever it can be:

- keys that name a secret (`api_key`, `hf_token`, `password`, `sas`, ...): their value is
  masked in a flat mapping, at any depth of a config tree, and in `key=value` overrides;
- the password in a URL's userinfo, in any text (`postgresql://user:pw@host/db` ->
  `postgresql://user:***@host/db`), so a tracking or storage URI can be shown and logged;
- any value equal to the value of an environment variable whose name says it holds a
  secret (PHITUNE_API_KEY, HF_TOKEN, AZURE_CLIENT_SECRET, MLFLOW_TRACKING_PASSWORD, ...).

Masking is for what is shown and stored; what runs keeps the real values. Azure's
extra rules (refusing secrets in a remote job's overrides) live in phitune.azure.redact.
"""
from __future__ import annotations

import os
import re
from typing import Iterable

import yaml

MASK = "***"
_SECRET_KEY = re.compile(
    r"(^|[_-])(key|api_key|secret|password|passwd|token|credential|credentials|sas|connection_string)$", re.I)
_SECRET_ENV = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SAS|CONNECTION_STRING)", re.I)
# scheme://user:password@host -- the password runs to the last '@' before the host; RFC 3986
# ends the authority at '/', '?' or '#', and quotes or blanks end a URL inside text.
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@\"'<>]*:)[^\s/?#\"'<>]+@")
# Values shorter than this (characters) are not treated as secrets: "1", "true", "cpu".
_MIN_SECRET_CHARS = 8


def is_secret_key(name: str) -> bool:
    """`tracking.tags.api_token` -> True (the last dotted part names a secret)."""
    return bool(_SECRET_KEY.search(str(name).rsplit(".", 1)[-1]))


def secret_values() -> set[str]:
    """The values of environment variables whose names say they hold a secret."""
    return {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and v and len(v) >= _MIN_SECRET_CHARS}


def redact_text(text: str, secrets: set[str] | None = None) -> str:
    """Free text with URL passwords and secret environment values masked."""
    text = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", str(text))
    for value in sorted(secret_values() if secrets is None else secrets, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def _redact_scalar(value, secrets: set[str]):
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, (bool, int, float)) or value is None:  # a number can equal a secret (a PIN, an id)
        text = str(value)
        return value if redact_text(text, secrets) == text else MASK
    return value


def _masked(key, value) -> bool:
    return is_secret_key(str(key)) and value not in (None, "")


def redact_mapping(flat: dict, secrets: set[str] | None = None) -> dict:
    """A flat mapping (params, tags) with secret-named keys and secret values masked."""
    secrets = secret_values() if secrets is None else secrets
    return {k: MASK if _masked(k, v) else _redact_scalar(v, secrets) for k, v in flat.items()}


def redact_tree(obj, secrets: set[str] | None = None):
    """A copy of a JSON-like tree (dicts, lists) with secret-named keys masked at any depth."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {_redact_scalar(k, secrets): MASK if _masked(k, v) else redact_tree(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v, secrets) for v in obj)
    return _redact_scalar(obj, secrets)


def override_key(override: str) -> str:
    """`+a.b=1` -> `a.b`; `~a.b` -> `a.b`."""
    return override.split("=", 1)[0].lstrip("+~")


def redact_overrides(overrides: Iterable[str], secrets: set[str] | None = None) -> list[str]:
    """Hydra overrides for display: `+tracking.tags.api_token=x` -> `+tracking.tags.api_token=***`."""
    secrets = secret_values() if secrets is None else secrets
    out = []
    for ov in overrides:
        head, sep, value = str(ov).partition("=")
        out.append(f"{head}={MASK}" if sep and value and is_secret_key(override_key(ov)) else redact_text(ov, secrets))
    return out


def redact_yaml(text: str, secrets: set[str] | None = None) -> str:
    """A YAML document masked as a tree (secret-named keys at any depth, URL passwords, secret values).

    Masked on the tree, not the text, so that the result stays YAML that reads back
    (`note: ***` would be an alias); re-dumped only when something was masked, so a
    clean document keeps its own layout. Text that is not YAML is masked as text.
    """
    secrets = secret_values() if secrets is None else secrets
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return redact_text(text, secrets)
    masked = redact_tree(tree, secrets)
    if masked == tree:
        return text
    return yaml.safe_dump(masked, sort_keys=False, allow_unicode=True, default_flow_style=False)


def quiet_mlflow_url(uri: str) -> None:
    """MLflow prints `View run ... at: <tracking URI>` as a run on a server ends, password
    and all: when the URI carries one, switch that line off (MLflow's own setting)."""
    if redact_text(str(uri), set()) != str(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
