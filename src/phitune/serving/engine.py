"""Batched generation, a bounded queue in front of it, and a deadline per request.

ChatGenerator is not thread-safe, so a single worker thread owns the model. With
`max_batch` > 1 it decodes up to that many requests together (phitune.serving.batch):
each step is one forward over every active sequence; queued requests join between
steps and finished ones leave, so a short answer never waits for a long one. With
`max_batch` 1 (or a generator that cannot batch) it runs one generation at a time,
in arrival order, through ChatGenerator.stream. At most `max_queue` + 1 requests are
held (decoding or queued), whatever `max_batch` is; one more is refused at once (429)
instead of piling up.
Each job carries a deadline (the request timeout, counted from arrival): a job still queued at its deadline is dropped, a running one
stops at the next token, and the client gets a timeout error. A job whose client
went away is cancelled the same way, so nobody's tokens are generated for nothing.

The worker reports to the request's event loop through an asyncio.Queue:
("start", prompt_tokens), ("delta", text)... (streaming requests only), then
("done", result) or ("error", APIError) or ("timeout", None). A batched step posts the
events of all its rows to the loop at once (one wake-up per step, not per token and row).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from contextlib import contextmanager
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
    adapter: str | None = None  # a peft adapter's name (multi-adapter serving); None: the model as loaded


class Job:
    def __init__(self, engine: "Engine", params: GenParams, deadline: float, loop: asyncio.AbstractEventLoop):
        self.engine, self.params, self.deadline, self._loop = engine, params, deadline, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.released = False
        self.first_token_at: float | None = None  # time.monotonic() when its first token was sampled
        self._held = None  # an event that more_deltas() took off the queue: next_event() returns it first

    def emit(self, kind: str, payload=None) -> None:
        outbox = getattr(self.engine, "_outbox", None)
        if outbox is not None:  # inside a batched step: sent with the step's other events
            outbox.append((self, (kind, payload)))
        else:
            _post([(self, (kind, payload))])

    def more_deltas(self) -> list[str]:
        """The texts of the delta events already queued, without waiting: a stream that fell
        behind the batch sends them as one chunk, not one chunk (and socket write) each."""
        texts = []
        while self._held is None and not self.events.empty():
            kind, payload = self.events.get_nowait()
            if kind == "delta":
                texts.append(payload)
            else:
                self._held = (kind, payload)
        return texts

    def cancel(self) -> None:
        """Stop this job (queued or running) and free its place in the queue."""
        self.cancelled.set()
        self.engine._release(self)

    async def next_event(self):
        """The worker's next event; ("timeout", None) once the deadline has passed."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", None
        if self._held is not None:
            event, self._held = self._held, None
            return event
        if not self.events.empty():  # already here: no timer and no task (wait_for makes both, per token)
            return self.events.get_nowait()
        try:
            return await asyncio.wait_for(self.events.get(), remaining)
        except asyncio.TimeoutError:
            return "timeout", None


class Engine:
    def __init__(self, generator, max_queue: int = 16, timeout_s: float = 120.0, default_max_tokens: int = 256,
                 on_batch=None, max_batch: int = 1):
        self.generator = generator
        self.on_batch = on_batch  # called with the number of sequences decoded together as a job starts decoding
        self.max_queue = int(max_queue)
        # A stand-in generator (tests' gated wrapper, a classifier's) has no model to batch over.
        self.max_batch = max(1, int(max_batch)) if hasattr(generator, "model") else 1
        self.timeout_s = float(timeout_s)
        self.default_max_tokens = int(default_max_tokens)
        self._pending = 0  # queued + decoding
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self.served = 0
        self.largest_batch = 0  # most sequences decoded in one forward so far
        # Events of the batched step under way (worker thread only), posted together when it ends:
        # one wake-up of the event loop per step, not one per token of every row.
        self._outbox: list | None = None
        work = self._work if self.max_batch == 1 else self._work_batched
        self._thread = threading.Thread(target=work, name="phitune-generate", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def capacity(self) -> int:
        """Requests queued or decoding before a 429: max_queue + 1, as without batching (the bound on
        what the server holds does not move with --max-batch; of those, up to max_batch decode)."""
        return self.max_queue + 1

    def submit(self, params: GenParams, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        with self._lock:
            if self._pending >= self.capacity:
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

    def _observe(self, n: int) -> None:
        self.largest_batch = max(self.largest_batch, n)
        if self.on_batch is not None:
            self.on_batch(n)

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
                job.emit("error", _internal_error())
            finally:
                self._release(job)

    def _prompt(self, job: Job) -> list[int] | None:
        """The job's prompt ids, or None once its error (400) or timeout has been sent."""
        g, p = self.generator, job.params
        if time.monotonic() >= job.deadline:
            job.emit("timeout")
            return None
        try:
            prompt = g.prompt_ids(p.messages)
        except Exception as exc:  # the chat template may reject an order of roles
            job.emit("error", APIError(400, f"cannot apply the model's chat template to these messages: {exc}",
                                       param="messages", code="invalid_messages"))
            return None
        if len(prompt) >= g.context_length:
            job.emit("error", APIError(
                400, f"This model's maximum context length is {g.context_length} tokens. However, your messages "
                     f"resulted in {len(prompt)} tokens. Please reduce the length of the messages.",
                param="messages", code="context_length_exceeded"))
            return None
        return prompt

    def _run(self, job: Job) -> None:
        g, p = self.generator, job.params
        prompt = self._prompt(job)
        if prompt is None:
            return
        n_prompt = len(prompt)
        try:
            tokens = g.stream(p.messages, p.max_tokens or self.default_max_tokens, p.temperature, p.top_p, p.stop, p.seed,
                             adapter=p.adapter)
        except PhituneError as exc:
            job.emit("error", APIError(400, str(exc), param=None, code="invalid_value"))
            return
        job.emit("start", n_prompt)
        self._observe(1)
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

    # -- batched (max_batch > 1) ----------------------------------------------------------
    def _work_batched(self) -> None:
        from phitune.serving.batch import BatchDecoder

        decoder, jobs = BatchDecoder(self.generator), {}  # id(Sequence) -> Job
        while True:
            if not self._admit(decoder, jobs):
                return
            if not decoder.rows:
                continue
            self.largest_batch = max(self.largest_batch, len(decoder))
            try:
                with self._one_post():
                    gone = [seq for seq, delta in decoder.step() if not self._advance(jobs[id(seq)], seq, delta)]
                decoder.leave(gone)
                for seq in gone:
                    del jobs[id(seq)]
            except Exception:  # a bug: every job of this batch gets a 500, the server keeps serving
                log.exception("batched generation failed")
                for job in jobs.values():
                    self._end(job, "error", _internal_error())
                jobs.clear()
                decoder.clear()

    @contextmanager
    def _one_post(self):
        """Collect the events emitted inside and post them together at the end (even on an error)."""
        self._outbox = []
        try:
            yield
        finally:
            events, self._outbox = self._outbox, None
            _post(events)

    def _admit(self, decoder, jobs: dict) -> bool:
        """Take queued jobs into the batch until it is full or the queue is empty (waiting for one when the
        batch is empty); those taken together run their prompts in one forward. False when the engine is
        closing."""
        taken, closing = [], False
        while len(decoder) + len(taken) < self.max_batch:
            try:
                job = self._jobs.get(block=not decoder.rows and not taken)
            except queue.Empty:
                break
            if job is None:
                closing = True
                break
            try:
                seq = self._sequence(job)
            except Exception:  # a bug in one request's checks: its 500, the others go on
                log.exception("generation failed")
                self._end(job, "error", _internal_error())
                continue
            if seq is not None:
                taken.append((job, seq))
        if taken:
            with self._one_post():
                self._join(decoder, jobs, taken)
        if closing:
            for seq in decoder.rows:
                self._release(jobs.pop(id(seq)))
            return False
        return True

    def _sequence(self, job: Job):
        """The job's decoding state, or None once it was released or answered with its error."""
        from phitune.serving.batch import Sequence

        if job.cancelled.is_set():
            self._release(job)
            return None
        prompt, p = self._prompt(job), job.params
        if prompt is None:
            self._release(job)
            return None
        max_tokens = p.max_tokens or self.default_max_tokens
        try:
            self.generator._check(p.messages, max_tokens, p.temperature, p.top_p)
        except PhituneError as exc:
            self._end(job, "error", APIError(400, str(exc), param=None, code="invalid_value"))
            return None
        loaded = getattr(self.generator, "adapters", [])
        if p.adapter is not None and p.adapter not in loaded:
            self._end(job, "error", APIError(400, f"no adapter {p.adapter!r} is loaded (loaded: "
                                                  f"{', '.join(loaded) or 'none'})", param="model",
                                             code="model_not_found"))
            return None
        return Sequence(self.generator, prompt, max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.adapter)

    def _join(self, decoder, jobs: dict, taken: list) -> None:
        """Prefill the taken (job, sequence) pairs together and stream each one's first token."""
        for k, (job, seq) in enumerate(taken, 1):
            job.emit("start", len(seq.prompt))
            self._observe(len(decoder) + k)
        try:
            deltas = decoder.join_many([seq for _, seq in taken])
        except Exception:
            log.exception("generation failed")
            for job, _ in taken:
                self._end(job, "error", _internal_error())
            return
        for (job, seq), delta in zip(taken, deltas):
            if self._advance(job, seq, delta):
                jobs[id(seq)] = job
            else:
                decoder.leave([seq])

    def _advance(self, job: Job, seq, delta: str) -> bool:
        """Report one sampled token of job; False when the job has left (done, cancelled, timed out)."""
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        if job.cancelled.is_set():
            self._release(job)
            return False
        if time.monotonic() >= job.deadline:
            self._end(job, "timeout")
            return False
        if delta and job.params.stream:
            job.emit("delta", delta)
        if seq.done:
            self.served += 1
            self._end(job, "done", seq.result())
            return False
        return True

    def _end(self, job: Job, kind: str, payload=None) -> None:
        job.emit(kind, payload)
        self._release(job)


def _post(events: list) -> None:
    """Hand (job, event) pairs to their jobs' event loops: one wake-up of each loop for all of them
    (each call_soon_threadsafe writes to the loop's self-pipe and wakes it)."""
    by_loop: dict = {}
    for job, event in events:
        by_loop.setdefault(job._loop, []).append((job, event))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, pairs)
        except RuntimeError:  # the event loop is gone (server shutting down)
            for job, _ in pairs:
                job.cancelled.set()


def _deliver(pairs: list) -> None:
    for job, event in pairs:
        job.events.put_nowait(event)


def _internal_error() -> APIError:
    return APIError(500, "internal error while generating; see the server log", "server_error", None, "internal_error")
