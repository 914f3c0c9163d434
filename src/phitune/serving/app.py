"""The OpenAI-compatible web app: /v1/chat/completions (plain and SSE), /v1/models, /health, /metrics,
/playground (a chat page over this API).

    app = build_app(generator, api_key="...", settings=ServerSettings(model_id="support-bot"),
                    prompt_filter=..., completion_filter=...)
    app = build_app(models.generator, api_key="...", models=models)  # several models (serving/models.py)

Responses follow OpenAI's chat-completions format plus Azure OpenAI's content-filter
annotations: `prompt_filter_results` on the response (first chunk when streaming)
and `content_filter_results` on each choice. A blocked prompt is a 400 with code
`content_filter`; a blocked completion ends with `finish_reason: "content_filter"`
(non-streaming: no content; streaming: the chunks already screened, then the stop).
Errors always carry OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from phitune.safety.filter import ContentFilter, FilterResult, StreamScreen
from phitune.serving.auth import KeyChecker, presented_key
from phitune.serving.engine import Engine, GenParams, QueueFull
from phitune.serving.metrics import SCOPE_KEY, Exchange, MetricsMiddleware, ServingMetrics
from phitune.serving.models import Entry, ModelSet
from phitune.serving.playground import add_routes as add_playground_routes
from phitune.serving.request_log import RequestLog
from phitune.serving.schemas import APIError, invalid, parse_chat_request

log = logging.getLogger("phitune.serving")
FINGERPRINT = "phitune"


@dataclass
class ServerSettings:
    model_id: str = "phitune"
    max_body_bytes: int = 1_000_000  # 413 above this
    max_tokens_limit: int | None = None  # None: the model's context length
    default_max_tokens: int = 256  # when a request gives no max_tokens
    request_timeout_s: float = 120.0  # from arrival, queueing included
    max_queue: int = 16  # requests held beyond the first (decoding or waiting); one more gets 429
    max_batch: int = 8  # requests decoded together (one forward per token for all); 1: one at a time
    model_info: dict = field(default_factory=dict)  # extra fields for /v1/models (version, uri)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class AuthMiddleware:
    """401 in OpenAI's error JSON for any /v1 path without the right key (before routing,
    so an unknown /v1 path tells an unauthenticated caller nothing)."""

    def __init__(self, app, checker: KeyChecker):
        self.app, self.checker = app, checker

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
            key = presented_key(headers)
            if not self.checker.check(key):
                message = ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY' "
                           "(the key phitune serve printed, $PHITUNE_API_KEY or --api-key-file)."
                           if key is None else "Incorrect API key provided.")
                err = APIError(401, message, "invalid_request_error", None, "invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 when it is over `limit` bytes (Content-Length or counted)."""
    declared = request.headers.get("content-length")
    too_big = None
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise invalid("bad Content-Length header", None, "invalid_header") from None
        if size > limit:
            too_big = size
    chunks, size = [], 0
    # Drain what the client sends (up to a bound) even when refusing it: a server that
    # answers and hangs up mid-upload makes the client see a reset instead of the 413.
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = too_big or size
            if size > 8 * limit:
                break
        elif too_big is None:
            chunks.append(chunk)
    if too_big is not None:
        raise APIError(413, f"The request body is larger than the limit of {limit} bytes.", "invalid_request_error",
                       None, "request_too_large")
    return b"".join(chunks)


def parse_json(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise invalid(f"We could not parse the JSON body of your request{detail}. The body must be a JSON object "
                      "such as {\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}.", None, "invalid_json") from None


async def _screen(content_filter: ContentFilter | None, text: str) -> FilterResult:
    if content_filter is None:
        return FilterResult(enabled=False)
    if getattr(content_filter.backend, "remote", False):  # network I/O: off the event loop
        return await run_in_threadpool(content_filter.check, text)
    return content_filter.check(text)


async def _feed(screen: StreamScreen, delta: str | None):
    remote = getattr(screen.filter.backend, "remote", False)
    call = screen.finish if delta is None else (lambda: screen.feed(delta))
    return await run_in_threadpool(call) if remote else call()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ChatService:
    """What the routes serve: the models (one, or several adapters of one base) behind the
    engine, the filters, the settings.

    Each route is a plain method; `build_app` only wires them to FastAPI.
    """

    def __init__(self, generator, settings: ServerSettings, prompt_filter: ContentFilter | None,
                 completion_filter: ContentFilter | None, request_log: RequestLog | None = None, tracer=None,
                 models: ModelSet | None = None):
        self.settings = settings
        self.model_set = models or ModelSet.single_model(generator, settings.model_id, settings.model_info)
        self.limit = int(settings.max_tokens_limit or generator.context_length)  # max_tokens accepted
        self.engine = Engine(generator, settings.max_queue, settings.request_timeout_s,
                             min(settings.default_max_tokens, self.limit),
                             on_batch=lambda n: self.metrics.batch.observe(n), max_batch=settings.max_batch)
        self.metrics = ServingMetrics(lambda: self.engine.pending, self.engine.capacity)
        self.request_log, self.tracer = request_log, tracer  # tracer: phitune.serving.traces.Tracer
        self.prompt_filter, self.completion_filter = prompt_filter, completion_filter
        self.model_id = settings.model_id if self.model_set.single else self.model_set.names[0]
        self.created = int(time.time())
        self.timeout = APIError(504, f"The request timed out after {self.engine.timeout_s:g} s (waiting and "
                                     "generating).", "timeout_error", None, "timeout")

    # -- GET routes -------------------------------------------------------------------
    async def health(self):
        pf, cf = self.prompt_filter, self.completion_filter
        several = {} if self.model_set.single else {"models": self.model_set.names}
        return {"status": "ok", "model": self.model_id, **several, "pending": self.engine.pending,
                "max_queue": self.engine.max_queue,
                "content_filter": {"prompt": pf.backend_name if pf else "off",
                                   "completion": cf.backend_name if cf else "off"}}

    def _model_card(self, entry: Entry) -> dict:
        now = {k: v for k, v in entry.info.items() if k in ("version", "uri")}  # it changes under --follow
        return {"id": entry.name, "object": "model", "created": self.created, "owned_by": "phitune",
                **self.settings.model_info, **now}

    async def models(self):
        return {"object": "list", "data": [self._model_card(e) for e in self.model_set.entries()]}

    async def prometheus(self):
        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)

    async def model(self, name: str):
        entry = self.model_set.pick(name)
        if entry is None:
            raise _unknown_model(name, self.model_set.names)
        return self._model_card(entry)

    def _entry(self, name: str | None, ex: Exchange) -> Entry:
        """The served model a request names: 404 for an unknown name, 400 for none among several."""
        entry = self.model_set.pick(name)
        if entry is None:
            ex.model = "unknown"  # a client's string never becomes a metric label
            if name is None:
                served = ", ".join(f"'{n}'" for n in self.model_set.names)
                raise APIError(400, f"This server serves several models ({served}): name one in `model` "
                                    "(GET /v1/models).", "invalid_request_error", "model", "missing_required_parameter")
            raise _unknown_model(name, self.model_set.names)
        ex.model = entry.name
        return entry

    # -- POST /v1/chat/completions ------------------------------------------------------
    async def chat_completions(self, request: Request):
        _require_json(request)
        ex = request.scope.get(SCOPE_KEY) or Exchange(time.monotonic())
        req = parse_chat_request(parse_json(await read_body(request, self.settings.max_body_bytes)), self.limit)
        name = self._entry(req.model, ex).name
        prompt_results = await self._screen_prompt(req.messages)
        entry, job = self._submit(req, name)
        prompt_tokens = await self._started(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": entry.name,
                "system_fingerprint": FINGERPRINT}
        if req.stream:
            return StreamingResponse(self._stream(job, head, prompt_tokens, prompt_results, req, ex, entry),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await self._complete(job, head, prompt_tokens, prompt_results, req, ex, entry))

    def _finished(self, ex: Exchange, job, req, head: dict, text: str | None, finish: str, prompt_tokens: int,
                  completion_tokens: int, entry: Entry) -> None:
        """Note the outcome for the metrics (counted when the response ends) and the request log."""
        ex.finish_reason, ex.first_token_at = finish, job.first_token_at
        ex.prompt_tokens, ex.completion_tokens = prompt_tokens, completion_tokens
        info = {**self.settings.model_info, **entry.info}
        model = {"model": entry.name, "model_version": info.get("version"),
                 "model_uri": info.get("resolved_uri") or info.get("uri")}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        if self.request_log is not None and text is not None and finish in ("stop", "length"):
            self.request_log.write(req.messages, text, {"id": head["id"], **model, "finish_reason": finish,
                                                        "usage": usage})
        if self.tracer is not None and self.tracer.sampled():
            params = {"temperature": req.temperature, "top_p": req.top_p, "max_tokens": req.max_tokens,
                      "stop": req.stop, "stream": req.stream}
            self.tracer.record(ex.arrived, req.messages, params, text, {"finish_reason": finish, "usage": usage},
                               {**model, "response_id": head["id"]})

    async def _screen_prompt(self, messages) -> list | None:
        """The prompt's Azure-style verdict (None when unfiltered); APIError when it is blocked."""
        verdict = await _screen(self.prompt_filter, "\n".join(m["content"] for m in messages))
        if verdict.filtered_categories:
            self.metrics.blocked("prompt", verdict)
            flagged = ", ".join(f"{c} {s}" for c, s in verdict.flagged())
            raise APIError(400, f"The response was filtered due to the prompt triggering the content management "
                                f"policy ({flagged}). Please modify your prompt and retry.", "invalid_request_error",
                           "prompt", "content_filter",
                           extra={"status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation",
                                                                "content_filter_result": verdict.to_azure()}})
        if verdict.blocked_by_error:
            raise APIError(503, f"The content filter is unavailable: {verdict.error}", "server_error", None,
                           "content_filter_unavailable")
        return [{"prompt_index": 0, "content_filter_results": verdict.to_azure()}] if verdict.enabled else None

    def _submit(self, req, name: str) -> tuple[Entry, object]:
        """(the entry answering, its queued job). Looked up and queued in one step under the
        model set's lock: a --follow swap falls before or after it, never in between."""
        try:
            with self.model_set.lock:
                entry = self.model_set.pick(name)
                return entry, self.engine.submit(GenParams(req.messages, req.max_tokens, req.temperature, req.top_p,
                                                           req.stop, req.seed, req.stream,
                                                           adapter=self.model_set.adapter(entry)))
        except QueueFull:
            raise APIError(429, f"The server is busy: {self.engine.max_queue} requests are already waiting. Retry "
                                "shortly.", "rate_limit_error", None, "rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None

    async def _started(self, job) -> int:
        """The prompt's token count once the worker has taken the job (or its error)."""
        try:
            kind, payload = await job.next_event()
        except BaseException:
            job.cancel()
            raise
        if kind != "start":
            job.cancel()
            raise self.timeout if kind == "timeout" else payload
        return payload

    async def _complete(self, job, head: dict, prompt_tokens: int, prompt_results, req, ex: Exchange,
                        entry: Entry) -> dict:
        try:
            while True:
                kind, payload = await job.next_event()
                if kind == "done":
                    result = payload
                    break
                if kind == "timeout":
                    raise self.timeout
                if kind == "error":
                    raise payload
        finally:
            job.cancel()
        verdict = await _screen(self.completion_filter, result["text"])
        finish, content = result["finish_reason"], result["text"]
        if verdict.filtered:
            finish, content = "content_filter", None
            self.metrics.blocked("completion", verdict)
        self._finished(ex, job, req, head, content, finish, prompt_tokens, result["completion_tokens"], entry)
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                  "finish_reason": finish}
        if verdict.enabled:
            choice["content_filter_results"] = verdict.to_azure()
        body = {**head, "object": "chat.completion", "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": result["completion_tokens"],
                          "total_tokens": prompt_tokens + result["completion_tokens"]}}
        if prompt_results is not None:
            body["prompt_filter_results"] = prompt_results
        return body

    async def _stream(self, job, head, prompt_tokens, prompt_results, req, ex: Exchange, entry: Entry):
        def chunk(choices, **extra):
            return _sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

        def content(text):
            return chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])

        screen = StreamScreen(self.completion_filter) if self.completion_filter is not None else None
        deltas, finish, completion_tokens, sent = 0, None, None, []
        try:
            if prompt_results is not None:  # Azure sends the prompt's verdict first, with no choices
                yield chunk([], prompt_filter_results=prompt_results)
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
            while finish is None:
                kind, payload = await job.next_event()
                if kind == "delta":
                    more = job.more_deltas()
                    deltas += 1 + len(more)
                    payload = "".join([payload, *more])
                    out, blocked = (payload, None) if screen is None else await _feed(screen, payload)
                    if out:
                        sent.append(out)
                        yield content(out)
                    if blocked is not None:
                        job.cancel()  # stop generating what nobody will see
                        finish, completion_tokens = "content_filter", deltas
                elif kind == "done":
                    out, blocked = ("", None) if screen is None else await _feed(screen, None)
                    if out:
                        sent.append(out)
                        yield content(out)
                    finish = "content_filter" if blocked is not None else payload["finish_reason"]
                    completion_tokens = payload["completion_tokens"]
                else:  # timeout or error after the stream began: an error event, as OpenAI sends one
                    ex.finish_reason, ex.first_token_at = "error", job.first_token_at
                    yield _sse((self.timeout if kind == "timeout" else payload).body())
                    return
            if finish == "content_filter":
                self.metrics.blocked("completion", screen.result)
            self._finished(ex, job, req, head, "".join(sent), finish, prompt_tokens, completion_tokens, entry)
            last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
            if screen is not None and screen.result.enabled:
                last["content_filter_results"] = screen.result.to_azure()
            yield chunk([last])
            if req.include_usage:
                yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # finished, blocked, or the client went away
            if ex.first_token_at is None:
                ex.first_token_at = job.first_token_at


def _unknown_model(name: str, served: str | list[str]) -> APIError:
    listed = ", ".join(f"'{n}'" for n in ([served] if isinstance(served, str) else served))
    return APIError(404, f"The model '{name}' does not exist; this server serves {listed} (GET /v1/models).",
                    "invalid_request_error", "model", "model_not_found")


def _require_json(request: Request) -> None:
    """415 unless the body is declared JSON (application/json, optionally with a charset)."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {kind or 'none'}.", "invalid_request_error",
                       None, "unsupported_media_type")


async def _api_error(request, exc: APIError):
    return error_response(exc)


async def _http_error(request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        msg, code = f"Unknown request URL: {request.method} {request.url.path}.", "unknown_url"
    elif exc.status_code == 405:
        msg, code = f"Method {request.method} is not allowed on {request.url.path}.", "method_not_allowed"
    else:
        msg, code = str(exc.detail), None
    return error_response(APIError(exc.status_code, msg, "invalid_request_error", None, code,
                                   headers=dict(exc.headers or {})))


async def _unexpected(request, exc: Exception):
    log.exception("unhandled error")
    return error_response(APIError(500, "internal server error; see the server log", "server_error", None,
                                   "internal_error"))


def build_app(generator, api_key: str, settings: ServerSettings | None = None,
              prompt_filter: ContentFilter | None = None, completion_filter: ContentFilter | None = None,
              request_log: RequestLog | None = None, tracer=None, classifier=None,
              models: ModelSet | None = None) -> FastAPI:
    """classifier: a phitune.classify.predict.Classifier (then `generator` is a stand-in and chat answers 400).
    models: the names served and their adapters (default: `generator` alone, as settings.model_id)."""
    service = ChatService(generator, settings or ServerSettings(), prompt_filter, completion_filter, request_log,
                          tracer, models)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.model_set.stop)
        await asyncio.to_thread(service.engine.close, 2.0)
        if request_log is not None:
            request_log.close()
        if tracer is not None:
            await asyncio.to_thread(tracer.close)

    app = FastAPI(title="phitune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service, app.state.engine, app.state.settings = service, service.engine, service.settings
    app.add_middleware(AuthMiddleware, checker=KeyChecker(api_key))
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outermost: counts the 401s too
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/metrics", service.prometheus, methods=["GET"])
    add_playground_routes(app)
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", service.model, methods=["GET"])
    if classifier is None:
        app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    else:  # POST /v1/classifications, and chat refused (phitune.classify.serving)
        from phitune.classify.serving import add_routes

        add_routes(app, service, classifier)
    return app
