"""The category/severity model of the content filter, its configuration, and the
screening of streamed completions.

Azure AI Content Safety scores four harm categories on a four-level scale:

    severity   safe  low  medium  high
    Azure      0     2    4       6       (outputType FourSeverityLevels)

A category is *filtered* when its severity reaches that category's threshold
(`medium` unless configured: `low`, `medium`, `high` or `off`). The verdicts go
back to the caller in Azure OpenAI's shape, per category:
`{"hate": {"filtered": false, "severity": "safe"}, ...}`.

Configuration (a dict, or a YAML file with `load_safety_config(path)`); every key
is optional and a typo is an error:

    backend: local            # local | azure | off
    block_at: medium          # default threshold of every category
    thresholds: {violence: high, sexual: low}   # per category: low | medium | high | off
    on_error: block           # azure unreachable: block (fail closed) or allow
    stream_check_chars: null  # streamed completions are screened every N new characters
                              # (null: 0 = every word for local, 200 for azure)
    local:
      defaults: true          # include phitune.safety.defaults (shipped blocklists and patterns)
      blocklists: {violence: {high: ["some phrase"], medium: [...]}}
      patterns: [{category: violence, severity: high, regex: "\\bsome (regex|pattern)\\b"}]
    azure:
      endpoint: null          # default: $AZURE_CONTENT_SAFETY_ENDPOINT (the key: $AZURE_CONTENT_SAFETY_KEY)
      api_version: "2024-09-01"
      timeout_s: 10
    prompt: {...}             # the same keys, for prompts only (merged over the above)
    completion: {...}         # ... for completions only

In `prompt:` / `completion:` the thresholds merge per category, and blocklists and
patterns add to the shared ones; `enabled: false` there turns one direction off.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from phitune.errors import PhituneError

CATEGORIES = ("hate", "sexual", "violence", "self_harm")
SEVERITIES = ("safe", "low", "medium", "high")
SEVERITY_VALUE = {"safe": 0, "low": 2, "medium": 4, "high": 6}  # Azure's FourSeverityLevels
THRESHOLD_OFF = ("off", "none", "never")
BACKENDS = ("local", "azure", "off")

_DIRECTION_KEYS = {"enabled", "block_at", "thresholds", "local", "stream_check_chars", "on_error"}
_TOP_KEYS = {"backend", "block_at", "thresholds", "on_error", "stream_check_chars", "local", "azure",
             "prompt", "completion"}
_LOCAL_KEYS = {"defaults", "blocklists", "patterns"}
_AZURE_KEYS = {"endpoint", "api_version", "timeout_s"}

DEFAULT_CONFIG: dict = {
    "backend": "local",
    "block_at": "medium",
    "thresholds": {},
    "on_error": "block",
    "stream_check_chars": None,
    "local": {"defaults": True, "blocklists": {}, "patterns": []},
    "azure": {"endpoint": None, "api_version": "2024-09-01", "timeout_s": 10.0},
    "prompt": {},
    "completion": {},
}


class ContentSafetyError(PhituneError):
    """The filter could not give a verdict (Azure unreachable, refused the key, ...)."""


def severity_from_value(value: int) -> str:
    """Azure's numeric severity (0-7, four or eight levels) -> safe | low | medium | high."""
    value = int(value)
    if value >= 6:
        return "high"
    if value >= 4:
        return "medium"
    if value >= 2:
        return "low"
    return "safe"


def _severity_name(value: Any, where: str) -> str:
    name = str(value).lower()
    if name not in SEVERITIES:
        raise PhituneError(f"{where}: severity {value!r} is not one of {', '.join(SEVERITIES)}")
    return name


def _threshold(value: Any, where: str) -> int | None:
    """Threshold name -> Azure severity value from which text is filtered; None = never."""
    if value is None or value is False or str(value).lower() in THRESHOLD_OFF:
        return None
    name = str(value).lower()
    if name not in ("low", "medium", "high"):
        raise PhituneError(f"{where}: threshold {value!r} is not one of low, medium, high, off")
    return SEVERITY_VALUE[name]


@dataclass
class FilterResult:
    """Verdict on one text: a severity per category, which of them are filtered, and
    an error when the backend gave no verdict."""

    severities: dict = field(default_factory=lambda: {c: "safe" for c in CATEGORIES})
    filtered_categories: tuple = ()
    matches: dict = field(default_factory=dict)  # category -> matched terms (local backend; never sent)
    error: str | None = None
    blocked_by_error: bool = False
    enabled: bool = True

    @property
    def filtered(self) -> bool:
        return bool(self.filtered_categories) or self.blocked_by_error

    def flagged(self) -> list:
        """[(category, severity)] of the filtered categories, in CATEGORIES order."""
        return [(c, self.severities[c]) for c in CATEGORIES if c in self.filtered_categories]

    def to_azure(self) -> dict:
        """Azure OpenAI's `content_filter_results` object."""
        if not self.enabled:
            return {}
        out: dict = {c: {"filtered": c in self.filtered_categories, "severity": self.severities[c]} for c in CATEGORIES}
        if self.error:
            out["error"] = {"code": "content_filter_error", "message": self.error}
        return out

    def merged(self, other: "FilterResult") -> "FilterResult":
        """The worse of two verdicts, per category (for a text screened in pieces)."""
        if other is None:
            return self
        sev = {c: max(self.severities[c], other.severities[c], key=SEVERITY_VALUE.__getitem__) for c in CATEGORIES}
        filtered = tuple(c for c in CATEGORIES if c in self.filtered_categories or c in other.filtered_categories)
        matches = {c: list(self.matches.get(c, [])) + [m for m in other.matches.get(c, []) if m not in self.matches.get(c, [])]
                   for c in set(self.matches) | set(other.matches)}
        return FilterResult(sev, filtered, matches, self.error or other.error,
                            self.blocked_by_error or other.blocked_by_error, self.enabled or other.enabled)


class NullBackend:
    name = "off"

    def analyze(self, text: str):
        return {c: "safe" for c in CATEGORIES}, {}


class ContentFilter:
    """A backend (text -> severities) plus per-category thresholds."""

    def __init__(self, backend, thresholds: Mapping[str, int | None], on_error: str = "block", enabled: bool = True,
                 stream_check_chars: int = 0):
        self.backend = backend
        self.thresholds = {c: thresholds.get(c) for c in CATEGORIES}
        self.on_error = on_error
        self.enabled = enabled and not isinstance(backend, NullBackend)
        self.stream_check_chars = int(stream_check_chars)

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "name", type(self.backend).__name__) if self.enabled else "off"

    def __repr__(self) -> str:  # never shows a key: backends keep theirs out of repr
        th = {c: v for c, v in self.thresholds.items()}
        return f"ContentFilter(backend={self.backend!r}, thresholds={th}, enabled={self.enabled})"

    def check(self, text: str) -> FilterResult:
        if not self.enabled:
            return FilterResult(enabled=False)
        try:
            severities, matches = self.backend.analyze(text)
        except ContentSafetyError as exc:
            return FilterResult(error=str(exc), blocked_by_error=self.on_error == "block")
        filtered = tuple(c for c in CATEGORIES
                         if self.thresholds[c] is not None and SEVERITY_VALUE[severities[c]] >= self.thresholds[c])
        return FilterResult(dict(severities), filtered, dict(matches))


class StreamScreen:
    """Screens a completion while it streams: text is released only after the filter
    has seen it, so a blocked completion stops before the offending words go out.

    feed(delta) -> (text that may be sent now, verdict if this piece was filtered else None)
    finish()    -> (the rest of the text, verdict if filtered else None)
    `result` holds the worst verdict so far, for the final `content_filter_results`.

    The filter runs every `every_chars` new characters (0: at each word end), on
    the new text plus `overlap` characters before it, so a phrase that straddles two
    checks is still seen. A trailing partial word is held back until it ends (or
    grows past `max_hold` characters).
    """

    def __init__(self, content_filter: ContentFilter, every_chars: int | None = None, overlap: int = 256,
                 max_hold: int = 64):
        self.filter = content_filter
        self.every = content_filter.stream_check_chars if every_chars is None else int(every_chars)
        self.overlap = overlap
        self.max_hold = max_hold
        self.text = ""
        self.checked = 0  # text[:checked] has been screened
        self.emitted = 0  # text[:emitted] has been released
        self.result = FilterResult(enabled=content_filter.enabled)
        self.blocked = False

    def _screen(self, end: int):
        verdict = self.filter.check(self.text[max(0, self.checked - self.overlap):end])
        self.result = self.result.merged(verdict)
        self.checked = end
        if verdict.filtered:
            self.blocked = True
            return "", verdict
        out, self.emitted = self.text[self.emitted:end], end
        return out, None

    def feed(self, delta: str):
        if self.blocked:
            return "", None
        self.text += delta
        if not self.filter.enabled:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, None
        # Release up to the end of the last complete word.
        end = max(self.text.rfind(" "), self.text.rfind("\n"), self.text.rfind("\t")) + 1
        if len(self.text) - end > self.max_hold:
            end = len(self.text)
        if end <= self.checked or end - self.checked < max(1, self.every):
            return "", None
        return self._screen(end)

    def finish(self):
        if self.blocked:
            return "", None
        if not self.filter.enabled:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, None
        if self.checked < len(self.text) or self.checked == 0:
            return self._screen(len(self.text))
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out, None


# ---------------------------------------------------------------- configuration

def _check_keys(section: Mapping, allowed: set, where: str) -> None:
    if not isinstance(section, Mapping):
        raise PhituneError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise PhituneError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (allowed: {', '.join(sorted(allowed))})")


def _merge_local(base: Mapping, extra: Mapping | None) -> dict:
    out = {"defaults": base.get("defaults", True),
           "blocklists": {c: {s: list(t) for s, t in (sev or {}).items()} for c, sev in (base.get("blocklists") or {}).items()},
           "patterns": list(base.get("patterns") or [])}
    if extra:
        if "defaults" in extra:
            out["defaults"] = extra["defaults"]
        for cat, sevs in (extra.get("blocklists") or {}).items():
            for sev, terms in (sevs or {}).items():
                out["blocklists"].setdefault(cat, {}).setdefault(sev, []).extend(terms or [])
        out["patterns"].extend(extra.get("patterns") or [])
    return out


PRESETS = Path(__file__).with_name("presets")  # default.yaml (every key spelled out), strict.yaml


def safety_config_path(name_or_path: str | Path) -> Path:
    """A preset name (`strict`: phitune/safety/presets/strict.yaml) or a YAML path."""
    text = str(name_or_path)
    if "/" in text or text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return Path(text)
    preset = PRESETS / f"{text}.yaml"
    if not preset.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise PhituneError(f"safety config {text!r}: not a file, nor a preset ({known})")
    return preset


def load_safety_config(path: str | Path | None = None, overrides: Mapping | None = None) -> dict:
    """DEFAULT_CONFIG, then a YAML file or preset, then `overrides` (dicts merge, the rest replaces); validated."""
    import yaml

    config = copy.deepcopy(DEFAULT_CONFIG)
    layers = []
    if path:
        p = safety_config_path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PhituneError(f"{path}: cannot read the safety config: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise PhituneError(f"{path}: not valid YAML: {' '.join(str(exc).split())[:300]}") from None
        layers.append((loaded or {}, str(path)))
    if overrides:
        layers.append((overrides, "safety config"))
    for layer, where in layers:
        _check_keys(layer, _TOP_KEYS, where)
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(config.get(key), Mapping):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
    validate_config(config)
    return config


def validate_config(config: Mapping) -> None:
    where = "safety config"
    _check_keys(config, _TOP_KEYS, where)
    if config.get("backend") not in BACKENDS:
        raise PhituneError(f"{where}: backend {config.get('backend')!r} is not one of {', '.join(BACKENDS)}")
    _check_keys(config.get("local") or {}, _LOCAL_KEYS, f"{where}: local")
    _check_keys(config.get("azure") or {}, _AZURE_KEYS, f"{where}: azure")
    for direction in ("prompt", "completion"):
        section = config.get(direction) or {}
        _check_keys(section, _DIRECTION_KEYS, f"{where}: {direction}")
        _check_keys(section.get("local") or {}, _LOCAL_KEYS, f"{where}: {direction}.local")
    for direction in ("prompt", "completion"):
        _resolve(config, direction)  # thresholds, severities and regexes fail here, not at the first request


def _resolve(config: Mapping, direction: str) -> dict:
    section = config.get(direction) or {}
    where = f"safety config ({direction})"
    block_at = section.get("block_at", config.get("block_at", "medium"))
    default = _threshold(block_at, f"{where}: block_at")
    raw = {**(config.get("thresholds") or {}), **(section.get("thresholds") or {})}
    for cat in raw:
        if cat not in CATEGORIES:
            raise PhituneError(f"{where}: thresholds: unknown category {cat!r} (categories: {', '.join(CATEGORIES)})")
    thresholds = {c: _threshold(raw[c], f"{where}: thresholds.{c}") if c in raw else default for c in CATEGORIES}
    on_error = section.get("on_error", config.get("on_error", "block"))
    if on_error not in ("block", "allow"):
        raise PhituneError(f"{where}: on_error {on_error!r} is not block or allow")
    every = section.get("stream_check_chars", config.get("stream_check_chars"))
    if every is None:
        every = 200 if config.get("backend") == "azure" else 0
    local = _merge_local(config.get("local") or {}, section.get("local"))
    if config.get("backend") == "local":
        from phitune.safety.local import compile_rules

        compile_rules(local, where)  # fail early on a bad regex or severity
    return {"enabled": bool(section.get("enabled", True)), "thresholds": thresholds, "on_error": on_error,
            "stream_check_chars": int(every), "local": local}


def build_filter(config: Mapping | None = None, direction: str = "prompt") -> ContentFilter:
    """The ContentFilter for prompts or completions; `config` as load_safety_config returns it
    (a partial dict is completed with the defaults)."""
    if direction not in ("prompt", "completion"):
        raise ValueError(f"direction must be prompt or completion, got {direction!r}")
    if config is None or set(DEFAULT_CONFIG) - set(config):
        config = load_safety_config(overrides=config or {})
    spec = _resolve(config, direction)
    backend_name = config.get("backend", "local")
    if backend_name == "off" or not spec["enabled"]:
        backend = NullBackend()
    elif backend_name == "local":
        from phitune.safety.local import LocalBackend

        backend = LocalBackend.from_config(spec["local"])
    else:
        from phitune.safety.azure import AzureContentSafety

        az = config.get("azure") or {}
        backend = AzureContentSafety(endpoint=az.get("endpoint"), api_version=az.get("api_version") or "2024-09-01",
                                     timeout_s=float(az.get("timeout_s") or 10))
    return ContentFilter(backend, spec["thresholds"], spec["on_error"], spec["enabled"], spec["stream_check_chars"])


def build_filters(config: Mapping | None = None) -> "tuple[ContentFilter, ContentFilter]":
    """(prompt filter, completion filter)."""
    return build_filter(config, "prompt"), build_filter(config, "completion")
