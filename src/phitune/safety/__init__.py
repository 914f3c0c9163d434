"""Content filter with Azure AI Content Safety's categories and severities.

Categories: hate, sexual, violence, self_harm. Severities: safe, low, medium, high
(Azure's 0, 2, 4, 6). A category blocks from its threshold up (medium by default).
Backends: `local` (blocklists and regex patterns, defaults shipped in
phitune.safety.defaults) and `azure` (the Content Safety REST API).

    from phitune.safety import build_filters
    prompt_filter, completion_filter = build_filters({"backend": "local"})
    prompt_filter.check("some text").filtered
"""
from phitune.safety.filter import (
    CATEGORIES,
    SEVERITIES,
    ContentFilter,
    ContentSafetyError,
    FilterResult,
    StreamScreen,
    build_filter,
    build_filters,
    load_safety_config,
)

__all__ = ["CATEGORIES", "SEVERITIES", "ContentFilter", "ContentSafetyError", "FilterResult", "StreamScreen",
           "build_filter", "build_filters", "load_safety_config"]
