"""One generation at a time, a bounded queue in front of it, and a deadline per request.

A CPU (or one GPU) runs one generation well and several badly, and ChatGenerator
is not thread-safe, so a single worker thread runs the jobs in arrival order. At
most `max_queue` requests wait behind the running one; one more is refused at once
(429) instead of piling up. Each job carries a deadline (the request timeout,
counted from arrival): a job still queued at its deadline is dropped, a running one
stops at the next token, and the client gets a timeout error. A job whose client
went away is cancelled the same way, so nobody's tokens are generated for nothing.

The worker reports to the request's event loop through an asyncio.Queue:
("start", prompt_tokens), ("delta", text)... (streaming requests only), then
("done", result) or ("error", APIError) or ("timeout", None).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from phitune.errors import PhituneError
from phitune.serving.schemas import APIError

log = logging.getLogger("phitune.serving")


class QueueFull(Exception):
    pass


@dataclass
class GenParams:
    messages: list
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int | None
    stream: bool = True  # False: no ("delta", ...) events, only the result (one wake-up per request, not per token)


class Job:
    def __init__(self, engine: "Engine", params: GenParams, deadline: float, loop: asyncio.AbstractEventLoop):
        self.engine, self.params, self.deadline, self._loop = engine, params, deadline, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.released = False
        self.first_token_at: float | None = None  # time.monotonic() when its first token was sampled

    def emit(self, kind: str, payload=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop this job (queued or running) and free its place in the queue."""
        self.cancelled.set()
        self.engine._release(self)

    async def next_event(self):
        """The worker's next event; ("timeout", None) once the deadline has passed."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", None
        try:
            return await asyncio.wait_for(self.events.get(), remaining)
        except asyncio.TimeoutError:
            return "timeout", None


class Engine:
    def __init__(self, generator, max_queue: int = 16, timeout_s: float = 120.0, default_max_tokens: int = 256,
                 on_batch=None):
        self.generator = generator
        self.on_batch = on_batch  # called with the number of sequences decoded together (here 1) as a job starts
        self.max_queue = int(max_queue)
        self.timeout_s = float(timeout_s)
        self.default_max_tokens = int(default_max_tokens)
        self._pending = 0  # queued + running
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self.served = 0
        self._thread = threading.Thread(target=self._work, name="phitune-generate", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, params: GenParams, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        with self._lock:
            if self._pending >= self.max_queue + 1:  # the running job + max_queue waiting
                raise QueueFull
            self._pending += 1
        job = Job(self, params, time.monotonic() + self.timeout_s, loop or asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def _release(self, job: Job) -> None:
        with self._lock:
            if not job.released:
                job.released = True
                self._pending -= 1

    def close(self, timeout: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            except Exception:  # a bug, not bad input: log it, answer 500 in JSON, keep serving
                log.exception("generation failed")
                job.emit("error", APIError(500, "internal error while generating; see the server log", "server_error",
                                           None, "internal_error"))
            finally:
                self._release(job)

    def _run(self, job: Job) -> None:
        g, p = self.generator, job.params
        if time.monotonic() >= job.deadline:
            job.emit("timeout")
            return
        try:
            n_prompt = len(g.prompt_ids(p.messages))
        except Exception as exc:  # the chat template may reject an order of roles
            job.emit("error", APIError(400, f"cannot apply the model's chat template to these messages: {exc}",
                                       param="messages", code="invalid_messages"))
            return
        if n_prompt >= g.context_length:
            job.emit("error", APIError(
                400, f"This model's maximum context length is {g.context_length} tokens. However, your messages "
                     f"resulted in {n_prompt} tokens. Please reduce the length of the messages.",
                param="messages", code="context_length_exceeded"))
            return
        try:
            tokens = g.stream(p.messages, p.max_tokens or self.default_max_tokens, p.temperature, p.top_p, p.stop, p.seed)
        except PhituneError as exc:
            job.emit("error", APIError(400, str(exc), param=None, code="invalid_value"))
            return
        job.emit("start", n_prompt)
        if self.on_batch is not None:
            self.on_batch(1)
        for delta in tokens:
            if job.first_token_at is None:
                job.first_token_at = time.monotonic()
            if job.cancelled.is_set():
                tokens.close()
                return
            if time.monotonic() >= job.deadline:
                tokens.close()
                job.emit("timeout")
                return
            if p.stream:
                job.emit("delta", delta)
        if job.first_token_at is None and g.last_result["completion_tokens"]:  # ended at once (a stop token)
            job.first_token_at = time.monotonic()
        self.served += 1
        job.emit("done", dict(g.last_result))
