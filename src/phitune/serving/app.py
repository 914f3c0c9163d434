"""The OpenAI-compatible web app: /v1/chat/completions (plain and SSE), /v1/models, /health.

    app = build_app(generator, api_key="...", settings=ServerSettings(model_id="support-bot"),
                    prompt_filter=..., completion_filter=...)

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
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from phitune.safety.filter import ContentFilter, FilterResult, StreamScreen
from phitune.serving.auth import KeyChecker, presented_key
from phitune.serving.engine import Engine, GenParams, QueueFull
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
    max_queue: int = 16  # requests waiting behind the running one; one more gets 429
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


def build_app(generator, api_key: str, settings: ServerSettings | None = None,
              prompt_filter: ContentFilter | None = None, completion_filter: ContentFilter | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    limit = int(settings.max_tokens_limit or generator.context_length)
    engine = Engine(generator, settings.max_queue, settings.request_timeout_s,
                    min(settings.default_max_tokens, limit))
    created = int(time.time())
    model_id = settings.model_id

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close, 2.0)

    app = FastAPI(title="phitune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.add_middleware(AuthMiddleware, checker=KeyChecker(api_key))

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg, code = f"Unknown request URL: {request.method} {request.url.path}.", "unknown_url"
        elif exc.status_code == 405:
            msg, code = f"Method {request.method} is not allowed on {request.url.path}.", "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        return error_response(APIError(exc.status_code, msg, "invalid_request_error", None, code,
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, "internal server error; see the server log", "server_error", None,
                                       "internal_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "pending": engine.pending, "max_queue": engine.max_queue,
                "content_filter": {"prompt": prompt_filter.backend_name if prompt_filter else "off",
                                   "completion": completion_filter.backend_name if completion_filter else "off"}}

    def _model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "phitune", **settings.model_info}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_id}'.",
                           "invalid_request_error", "model", "model_not_found")
        return _model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat_request(parse_json(await read_body(request, settings.max_body_bytes)), limit)
        prompt_verdict = await _screen(prompt_filter, "\n".join(m["content"] for m in req.messages))
        prompt_results = ([{"prompt_index": 0, "content_filter_results": prompt_verdict.to_azure()}]
                          if prompt_verdict.enabled else None)
        if prompt_verdict.filtered_categories:
            flagged = ", ".join(f"{c} {s}" for c, s in prompt_verdict.flagged())
            raise APIError(400, f"The response was filtered due to the prompt triggering the content management "
                                f"policy ({flagged}). Please modify your prompt and retry.", "invalid_request_error",
                           "prompt", "content_filter",
                           extra={"status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation",
                                                                "content_filter_result": prompt_verdict.to_azure()}})
        if prompt_verdict.blocked_by_error:
            raise APIError(503, f"The content filter is unavailable: {prompt_verdict.error}", "server_error", None,
                           "content_filter_unavailable")
        try:
            job = engine.submit(GenParams(req.messages, req.max_tokens, req.temperature, req.top_p, req.stop, req.seed,
                                          req.stream))
        except QueueFull:
            raise APIError(429, f"The server is busy: {engine.max_queue} requests are already waiting. Retry shortly.",
                           "rate_limit_error", None, "rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        timeout = APIError(504, f"The request timed out after {engine.timeout_s:g} s (waiting and generating).",
                           "timeout_error", None, "timeout")
        try:
            kind, payload = await job.next_event()
        except BaseException:
            job.cancel()
            raise
        if kind != "start":
            job.cancel()
            raise timeout if kind == "timeout" else payload
        prompt_tokens = payload
        cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": now, "model": model_id, "system_fingerprint": FINGERPRINT}

        if req.stream:
            return StreamingResponse(
                _stream(job, head, prompt_tokens, prompt_results, req.include_usage, timeout),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        try:
            while True:
                kind, payload = await job.next_event()
                if kind == "done":
                    result = payload
                    break
                if kind == "timeout":
                    raise timeout
                if kind == "error":
                    raise payload
        finally:
            job.cancel()
        verdict = await _screen(completion_filter, result["text"])
        finish, content = result["finish_reason"], result["text"]
        if verdict.filtered:
            finish, content = "content_filter", None
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                  "finish_reason": finish}
        if verdict.enabled:
            choice["content_filter_results"] = verdict.to_azure()
        body = {**head, "object": "chat.completion", "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": result["completion_tokens"],
                          "total_tokens": prompt_tokens + result["completion_tokens"]}}
        if prompt_results is not None:
            body["prompt_filter_results"] = prompt_results
        return JSONResponse(body)

    async def _stream(job, head, prompt_tokens, prompt_results, include_usage, timeout):
        def chunk(choices, **extra):
            return _sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

        screen = StreamScreen(completion_filter) if completion_filter is not None else None
        deltas, finish, completion_tokens = 0, None, None
        try:
            if prompt_results is not None:  # Azure sends the prompt's verdict first, with no choices
                yield chunk([], prompt_filter_results=prompt_results)
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            while finish is None:
                kind, payload = await job.next_event()
                if kind == "delta":
                    deltas += 1
                    out, blocked = (payload, None) if screen is None else await _feed(screen, payload)
                    if out:
                        yield chunk([{"index": 0, "delta": {"content": out}, "logprobs": None, "finish_reason": None}])
                    if blocked is not None:
                        job.cancel()  # stop generating what nobody will see
                        finish, completion_tokens = "content_filter", deltas
                elif kind == "done":
                    out, blocked = ("", None) if screen is None else await _feed(screen, None)
                    if out:
                        yield chunk([{"index": 0, "delta": {"content": out}, "logprobs": None, "finish_reason": None}])
                    finish = "content_filter" if blocked is not None else payload["finish_reason"]
                    completion_tokens = payload["completion_tokens"]
                else:  # timeout or error after the stream began: an error event, as OpenAI sends one
                    err = timeout if kind == "timeout" else payload
                    yield _sse(err.body())
                    return
            last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
            if screen is not None and screen.result.enabled:
                last["content_filter_results"] = screen.result.to_azure()
            yield chunk([last])
            if include_usage:
                yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # finished, blocked, or the client went away

    return app
