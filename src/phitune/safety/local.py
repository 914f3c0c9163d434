"""The local content-filter backend: blocklists and regular expressions, no network.

Each rule has a category and a severity; a text's severity in a category is the
highest of the rules that match it. Terms match case-insensitively on whole words
(`kill` does not match `skill`); whitespace inside a term matches any run of
whitespace; the text is NFKC-normalised first, so full-width or ligature look-alikes
match too. Defaults: phitune.safety.defaults.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Mapping

from phitune.errors import PhituneError
from phitune.safety.filter import CATEGORIES, SEVERITY_VALUE, _severity_name

# Zero-width characters someone may put inside a word to slip it past a blocklist.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)


def _term_regex(term: str) -> str:
    words = str(term).split()
    if not words:
        raise ValueError("empty term")
    body = r"\s+".join(re.escape(w) for w in words)
    return rf"(?<!\w){body}(?!\w)"


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_INVISIBLE)


def compile_rules(local: Mapping, where: str = "safety config") -> list:
    """[(category, severity, compiled regex, label)] from a `local:` config section."""
    from phitune.safety import defaults

    blocklists: dict = {}
    patterns: list = []
    if local.get("defaults", True):
        for cat, sevs in defaults.BLOCKLISTS.items():
            for sev, terms in sevs.items():
                blocklists.setdefault(cat, {}).setdefault(sev, []).extend(terms)
        patterns.extend(defaults.PATTERNS)
    for cat, sevs in (local.get("blocklists") or {}).items():
        if not isinstance(sevs, Mapping):
            raise PhituneError(f"{where}: local.blocklists.{cat} must map severities to lists of terms")
        for sev, terms in sevs.items():
            if isinstance(terms, str) or not isinstance(terms, (list, tuple)):
                raise PhituneError(f"{where}: local.blocklists.{cat}.{sev} must be a list of terms")
            blocklists.setdefault(cat, {}).setdefault(sev, []).extend(terms)
    patterns.extend(local.get("patterns") or [])

    rules = []
    for cat, sevs in blocklists.items():
        if cat not in CATEGORIES:
            raise PhituneError(f"{where}: local.blocklists: unknown category {cat!r} (categories: {', '.join(CATEGORIES)})")
        for sev, terms in sevs.items():
            sev = _severity_name(sev, f"{where}: local.blocklists.{cat}")
            if sev == "safe":
                continue
            parts = []
            for term in terms:
                if not isinstance(term, str) or not term.strip():
                    raise PhituneError(f"{where}: local.blocklists.{cat}.{sev}: terms must be non-empty strings, got {term!r}")
                parts.append(_term_regex(normalize(term)))
            if parts:
                # One alternation per (category, severity): one scan instead of one per term.
                rules.append((cat, sev, re.compile("|".join(parts), re.IGNORECASE), f"blocklist:{cat}:{sev}"))
    for i, p in enumerate(patterns):
        if not isinstance(p, Mapping) or not {"category", "severity", "regex"} <= set(p):
            raise PhituneError(f"{where}: local.patterns[{i}] needs category, severity and regex")
        extra = set(p) - {"category", "severity", "regex", "name"}
        if extra:
            raise PhituneError(f"{where}: local.patterns[{i}]: unknown key(s) {', '.join(sorted(extra))}")
        cat = p["category"]
        if cat not in CATEGORIES:
            raise PhituneError(f"{where}: local.patterns[{i}]: unknown category {cat!r} (categories: {', '.join(CATEGORIES)})")
        sev = _severity_name(p["severity"], f"{where}: local.patterns[{i}]")
        try:
            rx = re.compile(str(p["regex"]), re.IGNORECASE)
        except re.error as exc:
            raise PhituneError(f"{where}: local.patterns[{i}]: bad regex {p['regex']!r}: {exc}") from None
        rules.append((cat, sev, rx, p.get("name") or f"pattern:{i}"))
    return rules


class LocalBackend:
    name = "local"

    def __init__(self, rules: list):
        self.rules = rules

    @classmethod
    def from_config(cls, local: Mapping) -> "LocalBackend":
        return cls(compile_rules(local))

    def __repr__(self) -> str:
        return f"LocalBackend({len(self.rules)} rules)"

    def analyze(self, text: str):
        """-> ({category: severity}, {category: [matched text, ...]})"""
        text = normalize(text or "")
        severities = {c: "safe" for c in CATEGORIES}
        matches: dict = {}
        for cat, sev, rx, _label in self.rules:
            if SEVERITY_VALUE[sev] <= SEVERITY_VALUE[severities[cat]] and cat in matches:
                continue  # already as severe from another rule
            m = rx.search(text)
            if m:
                matches.setdefault(cat, []).append(m.group(0))
                if SEVERITY_VALUE[sev] > SEVERITY_VALUE[severities[cat]]:
                    severities[cat] = sev
        return severities, matches

