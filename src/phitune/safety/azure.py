"""Azure AI Content Safety over REST: the `azure` content-filter backend.

    POST {endpoint}/contentsafety/text:analyze?api-version=2024-09-01
    Ocp-Apim-Subscription-Key: <key>
    {"text": "...", "categories": ["Hate", "Sexual", "Violence", "SelfHarm"], "outputType": "FourSeverityLevels"}
    -> {"blocklistsMatch": [], "categoriesAnalysis": [{"category": "Hate", "severity": 0}, ...]}

Severity 0/2/4/6 -> safe/low/medium/high. The endpoint and key come from
AZURE_CONTENT_SAFETY_ENDPOINT and AZURE_CONTENT_SAFETY_KEY (or the config's
`azure.endpoint`). The key is sent in the header only: never logged, never in
an error message or a repr. Texts over the service's 10,000-character limit are
analysed in pieces and the worst severity per category wins.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from phitune.errors import PhituneError
from phitune.safety.filter import CATEGORIES, SEVERITY_VALUE, ContentSafetyError, severity_from_value

ENV_ENDPOINT = "AZURE_CONTENT_SAFETY_ENDPOINT"
ENV_KEY = "AZURE_CONTENT_SAFETY_KEY"
API_VERSION = "2024-09-01"
MAX_CHARS = 10_000  # the service's limit per text:analyze request
AZURE_CATEGORIES = {"Hate": "hate", "Sexual": "sexual", "Violence": "violence", "SelfHarm": "self_harm"}


class AzureContentSafety:
    name = "azure"
    remote = True  # blocking network I/O: the server calls it off its event loop

    def __init__(self, endpoint: str | None = None, key: str | None = None, api_version: str = API_VERSION,
                 timeout_s: float = 10.0, retries: int = 1):
        endpoint = (endpoint or os.environ.get(ENV_ENDPOINT) or "").strip().rstrip("/")
        key = key or os.environ.get(ENV_KEY)
        if not endpoint:
            raise PhituneError(f"the azure content filter needs an endpoint: set {ENV_ENDPOINT} "
                               "(https://<resource>.cognitiveservices.azure.com) or azure.endpoint in the safety config")
        if not endpoint.startswith(("https://", "http://")):
            raise PhituneError(f"{ENV_ENDPOINT}={endpoint!r}: expected an https:// URL")
        if not key:
            raise PhituneError(f"the azure content filter needs a key: set {ENV_KEY}")
        self.endpoint = endpoint
        self.api_version = api_version
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.__key = key  # name-mangled: not in repr, vars() shows it only as _AzureContentSafety__key

    def __repr__(self) -> str:
        return f"AzureContentSafety(endpoint={self.endpoint!r}, api_version={self.api_version!r})"

    @property
    def url(self) -> str:
        return f"{self.endpoint}/contentsafety/text:analyze?api-version={self.api_version}"

    def _redact(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    def _post(self, text: str) -> dict:
        body = json.dumps({"text": text, "categories": list(AZURE_CATEGORIES), "outputType": "FourSeverityLevels"}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json", "Ocp-Apim-Subscription-Key": self.__key})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if exc.code in (429, 500, 502, 503, 504) and attempt < self.retries:
                    time.sleep(min(2.0, float(retry_after)) if retry_after and retry_after.isdigit() else 0.5)
                    continue
                raise ContentSafetyError(self._redact(f"Azure AI Content Safety: HTTP {exc.code}{_error_detail(exc)}")) from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt < self.retries:
                    time.sleep(0.2)
                    continue
                raise ContentSafetyError(self._redact(f"Azure AI Content Safety: cannot reach {self.endpoint}: {reason}")) from None
            except (ValueError, UnicodeDecodeError):
                raise ContentSafetyError("Azure AI Content Safety: the response is not JSON") from None
        raise ContentSafetyError("Azure AI Content Safety: no response")  # not reached

    def analyze(self, text: str):
        """-> ({category: severity}, {}); raises ContentSafetyError when there is no verdict."""
        severities = {c: "safe" for c in CATEGORIES}
        text = text or ""
        if not text.strip():
            return severities, {}  # the service rejects empty text; nothing to screen
        for start in range(0, len(text), MAX_CHARS):
            payload = self._post(text[start:start + MAX_CHARS])
            analysis = payload.get("categoriesAnalysis") if isinstance(payload, dict) else None
            if not isinstance(analysis, list):
                raise ContentSafetyError("Azure AI Content Safety: no categoriesAnalysis in the response")
            for item in analysis:
                cat = AZURE_CATEGORIES.get(str(item.get("category")))
                if cat is None:
                    continue
                try:
                    sev = severity_from_value(item.get("severity") or 0)
                except (TypeError, ValueError):
                    raise ContentSafetyError(f"Azure AI Content Safety: bad severity {item.get('severity')!r}") from None
                if SEVERITY_VALUE[sev] > SEVERITY_VALUE[severities[cat]]:
                    severities[cat] = sev
        return severities, {}


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """': code: message' from Azure's {"error": {"code", "message"}} body, if any."""
    try:
        err = json.loads(exc.read().decode("utf-8")).get("error") or {}
    except Exception:  # an HTML error page, an empty body: the status says enough
        return ""
    parts = [str(err.get(k)) for k in ("code", "message") if err.get(k)]
    return (": " + ": ".join(parts))[:500] if parts else ""
