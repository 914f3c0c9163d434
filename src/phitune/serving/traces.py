"""`phitune serve --trace-sample RATE`: MLflow traces of a sample of the served calls.

Each sampled chat completion becomes one MLflow trace (a CHAT_MODEL span named
`chat.completions`) in the experiment `phitune-serving` of the serving tracking store
(`--trace-experiment` to choose), timed from the request's arrival to its answer:
inputs = the messages and sampling parameters, outputs = the answer, its finish reason
and usage, attributes = the served model, its version and URI. Content is redacted as in
the request log unless `--log-request-content`. RATE is a fraction (0.1 = about one call
in ten, drawn independently per call); the MLflow writes run on one worker thread, never on
the event loop, and a failed write is logged, not raised into the request.
"""
from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

from phitune.errors import PhituneError
from phitune.serving.request_log import redacted

log = logging.getLogger("phitune.serving")
DEFAULT_EXPERIMENT = "phitune-serving"


def check_rate(rate: float) -> float:
    if not 0.0 <= rate <= 1.0:
        raise PhituneError(f"--trace-sample {rate:g}: expected a fraction from 0 to 1 (0.1: about one call in ten)")
    return float(rate)


class Tracer:
    def __init__(self, tracking_uri: str, rate: float, experiment: str = DEFAULT_EXPERIMENT,
                 keep_content: bool = False, rng: random.Random | None = None):
        from phitune.models.uri import client_for
        from phitune.tracking.experiment import sqlite_artifact_root

        self.rate, self.keep_content = check_rate(rate), bool(keep_content)
        self.rng = rng or random.Random()
        client = client_for(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            root = sqlite_artifact_root(tracking_uri)
            self.experiment_id = client.create_experiment(experiment, artifact_location=f"{root}/{experiment}"
                                                          if root else None)
        else:
            self.experiment_id = exp.experiment_id
        self.experiment = experiment
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="phitune-traces")

    def sampled(self) -> bool:
        return self.rate > 0 and self.rng.random() < self.rate

    def record(self, arrived: float, messages: list, params: dict, answer: str | None, outputs: dict,
               attributes: dict) -> None:
        """Queue one trace (call only for a sampled request); `arrived` is its time.monotonic()."""
        end_ns = time.time_ns()
        start_ns = end_ns - int((time.monotonic() - arrived) * 1e9)
        if not self.keep_content:
            messages = [{**m, "content": redacted(m["content"])} for m in messages]
            answer = None if answer is None else redacted(answer)
        self._pool.submit(self._write, start_ns, end_ns, {"messages": messages, **params},
                          {"message": {"role": "assistant", "content": answer}, **outputs}, attributes)

    def _write(self, start_ns, end_ns, inputs, outputs, attributes) -> None:
        import mlflow
        from mlflow.entities import SpanType

        try:
            span = mlflow.start_span_no_context("chat.completions", span_type=SpanType.CHAT_MODEL, inputs=inputs,
                                                attributes={k: v for k, v in attributes.items() if v is not None},
                                                experiment_id=self.experiment_id, start_time_ns=start_ns)
            span.set_outputs(outputs)
            span.end(end_time_ns=end_ns)
        except Exception:  # tracing is best effort: the answer was already sent
            log.exception("could not write an MLflow trace")

    def close(self, timeout: float = 10.0) -> None:
        import mlflow

        self._pool.shutdown(wait=True)
        flush = getattr(mlflow, "flush_trace_async_logging", None)
        if flush is not None:
            flush()
