"""Prometheus metrics of the endpoint (`GET /metrics`, prometheus-client's text format).

    phitune_requests_total{model, status, finish_reason}   chat completions answered
    phitune_request_duration_seconds{model}                arrival to the last byte sent
    phitune_time_to_first_token_seconds{model}             arrival to the first token's text (later only
                                                           when a stop string's prefix holds it back)
    phitune_prompt_tokens_total{model}, phitune_completion_tokens_total{model}
    phitune_queue_depth, phitune_queue_capacity            requests queued or decoding / the bound
    phitune_content_filter_blocks_total{target, category, severity}   target: prompt | completion
    phitune_batch_size                                     sequences decoded together, per request

Labels are bounded: `model` is a served model id, "unknown" for a name this server does
not serve and "" when the request was refused before naming one (401, unreadable body);
`finish_reason` is stop | length | content_filter, "error" for a stream that ended in an
error event, "cancelled" when the client went away, "none" for an error status.

Each app has its own registry (no process-global state), so two servers in one
process (tests, `phitune chat MODEL_URI`) count separately.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds. A tiny model on a CPU answers in milliseconds, a 3.8B one on a GPU in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CHAT_PATH = "/v1/chat/completions"
SCOPE_KEY = "phitune.exchange"  # where the route finds this request's Exchange in the ASGI scope


@dataclass
class Exchange:
    """What the route learnt about one request, for the middleware to count when it ends."""
    arrived: float  # time.monotonic()
    model: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # time.monotonic() of the first sampled token


class ServingMetrics:
    def __init__(self, queue_depth, queue_capacity: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("phitune_requests", "Chat-completion requests by model, HTTP status and finish reason",
                                ["model", "status", "finish_reason"], registry=r)
        self.latency = Histogram("phitune_request_duration_seconds", "Arrival to last byte of a chat completion",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("phitune_time_to_first_token_seconds", "Arrival to the first sampled token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("phitune_prompt_tokens", "Prompt tokens of answered requests", ["model"], registry=r)
        self.completion_tokens = Counter("phitune_completion_tokens", "Tokens sampled for answered requests",
                                         ["model"], registry=r)
        depth = Gauge("phitune_queue_depth", "Requests queued or decoding now", registry=r)
        depth.set_function(lambda: float(queue_depth()))
        Gauge("phitune_queue_capacity", "Requests that may be queued or decoding before a 429",
              registry=r).set(queue_capacity)
        self.blocks = Counter("phitune_content_filter_blocks", "Texts blocked by the content filter",
                              ["target", "category", "severity"], registry=r)
        self.batch = Histogram("phitune_batch_size", "Sequences decoded together, observed as a request starts decoding",
                               buckets=BATCH_BUCKETS, registry=r)

    def blocked(self, target: str, verdict) -> None:
        for category, severity in verdict.flagged():
            self.blocks.labels(target, category, severity).inc()

    def finished(self, ex: Exchange, status: int) -> None:
        if status >= 400:
            finish = "none"
        else:
            finish = ex.finish_reason or "cancelled"
        self.requests.labels(ex.model, str(status), finish).inc()
        self.latency.labels(ex.model).observe(time.monotonic() - ex.arrived)
        if ex.first_token_at is not None:
            self.ttft.labels(ex.model).observe(ex.first_token_at - ex.arrived)
        if status < 400:
            self.prompt_tokens.labels(ex.model).inc(ex.prompt_tokens)
            self.completion_tokens.labels(ex.model).inc(ex.completion_tokens)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every chat-completion request, the ones refused before the route (401)
    and after it (4xx/5xx) included; a stream counts when its last byte is sent."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        ex = scope[SCOPE_KEY] = Exchange(time.monotonic())
        status = 500  # an exception that escapes before the response starts

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.finished(ex, status)


# ---------------------------------------------------------------- reading /metrics back (`phitune deployments show`)

def _quantile(q: float, buckets: list) -> float | None:
    """Prometheus's histogram_quantile: linear inside the bucket holding rank q (seconds)."""
    buckets = sorted(buckets)  # [(upper bound, cumulative count)]
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower  # beyond the last finite bound: its bound is all we know
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def summarize(text: str) -> dict:
    """The exposition text of /metrics -> a small dict of totals and latency quantiles."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"requests": {}, "status": {}, "finish_reason": {}, "prompt_tokens": 0.0, "completion_tokens": 0.0,
           "blocks": {}, "queue_depth": None, "queue_capacity": None}
    hist: dict = {}  # family -> {"buckets": {le: count}, "sum", "count"} summed over labels except le
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "phitune_requests_total":
                model = labels["model"] or "(none)"
                out["requests"][model] = out["requests"].get(model, 0) + value
                out["status"][labels["status"]] = out["status"].get(labels["status"], 0) + value
                fr = labels["finish_reason"]
                out["finish_reason"][fr] = out["finish_reason"].get(fr, 0) + value
            elif name in ("phitune_prompt_tokens_total", "phitune_completion_tokens_total"):
                out[name[len("phitune_"):-len("_total")]] += value
            elif name == "phitune_content_filter_blocks_total":
                key = f"{labels['target']} {labels['category']} {labels['severity']}"
                out["blocks"][key] = out["blocks"].get(key, 0) + value
            elif name in ("phitune_queue_depth", "phitune_queue_capacity"):
                out[name[len("phitune_"):]] = value
            elif family.type == "histogram" and family.name.startswith("phitune_"):
                h = hist.setdefault(family.name, {"buckets": {}, "sum": 0.0, "count": 0.0})
                if name.endswith("_bucket"):
                    le = float(labels["le"])
                    h["buckets"][le] = h["buckets"].get(le, 0.0) + value
                elif name.endswith("_sum"):
                    h["sum"] += value
                elif name.endswith("_count"):
                    h["count"] += value
    for fam, key in (("phitune_request_duration_seconds", "latency_s"), ("phitune_time_to_first_token_seconds", "ttft_s"),
                     ("phitune_batch_size", "batch_size")):
        h = hist.get(fam, {"buckets": {}, "sum": 0.0, "count": 0.0})
        buckets = list(h["buckets"].items())
        out[key] = {"count": h["count"], "mean": h["sum"] / h["count"] if h["count"] else None,
                    "p50": _quantile(0.5, buckets), "p95": _quantile(0.95, buckets)}
    return out


def format_summary(s: dict) -> str:
    def n(x) -> str:
        return f"{x:g}" if x is not None else "-"

    def secs(x) -> str:
        return "-" if x is None else (f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s")

    def counts(d: dict) -> str:
        return ", ".join(f"{k} {n(v)}" for k, v in sorted(d.items())) or "none"

    total = sum(s["requests"].values())
    lines = [f"requests       {n(total)} ({counts(s['requests'])})",
             f"  by status    {counts(s['status'])}",
             f"  finished as  {counts(s['finish_reason'])}"]
    for key, what in (("latency_s", "latency"), ("ttft_s", "first token")):
        h = s[key]
        lines.append(f"{what:<14} p50 {secs(h['p50'])}, p95 {secs(h['p95'])}, mean {secs(h['mean'])} "
                     f"over {n(h['count'])} (quantiles from histogram buckets)")
    lines.append(f"tokens         prompt {n(s['prompt_tokens'])}, completion {n(s['completion_tokens'])}")
    lines.append(f"queue          {n(s['queue_depth'])} queued or decoding of {n(s['queue_capacity'])}")
    lines.append(f"batch size     mean {n(s['batch_size']['mean'])}")
    lines.append(f"filter blocks  {counts(s['blocks'])}")
    return "\n".join(lines)
