"""API keys for the endpoint: where the key comes from, and checking a request's key.

Order: `--api-key-file FILE` (first line), else $PHITUNE_API_KEY, else a new random
key that `phitune serve` prints once. Requests send it as `Authorization: Bearer KEY`
(what the openai client does) or as Azure's `api-key: KEY` header. The comparison
is constant-time on SHA-256 digests, so neither the key nor its length leaks
through timing; a key is never logged or echoed in an error.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import sys
from pathlib import Path

from phitune.errors import PhituneError

ENV_KEY = "PHITUNE_API_KEY"


def generate_key() -> str:
    return "pt-" + secrets.token_urlsafe(32)


def read_key_file(path: str | os.PathLike) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        mode = p.stat().st_mode
    except OSError as exc:
        raise PhituneError(f"--api-key-file {path}: cannot read: {exc.strerror or exc}") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise PhituneError(f"--api-key-file {path}: the file is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"note: {path} is readable by other users; `chmod 600 {path}` keeps the key private", file=sys.stderr)
    return key


def resolve_api_key(key_file: str | None = None, environ=None) -> "tuple[str, str]":
    """(key, source) with source "file", "env" or "generated"."""
    environ = os.environ if environ is None else environ
    if key_file:
        return read_key_file(key_file), "file"
    env = (environ.get(ENV_KEY) or "").strip()
    if env:
        return env, "env"
    return generate_key(), "generated"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class KeyChecker:
    def __init__(self, key: str):
        if not key:
            raise PhituneError("the API key must not be empty")
        self._digest = _digest(key)

    def __repr__(self) -> str:
        return "KeyChecker(***)"

    def check(self, presented: str | None) -> bool:
        if not presented:
            return False
        return hmac.compare_digest(_digest(presented), self._digest)


def presented_key(headers) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY` or `api-key: KEY`.

    `headers` maps lower-case header names to values (str or bytes)."""
    def get(name):
        value = headers.get(name)
        return value.decode("latin-1") if isinstance(value, bytes) else value

    auth = get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    api_key = get("api-key")
    return api_key.strip() if api_key else None
