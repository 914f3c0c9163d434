"""Request parsing and OpenAI-style errors for the chat-completions endpoint.

Every bad input becomes an APIError with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` and a 4xx status, so a client
never sees a 500 or a stack trace for its own mistake.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for system instructions
MAX_STOP = 4  # as OpenAI

# Accepted and ignored (a client library may send them with their neutral values).
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options", "logit_bias",
            "frequency_penalty", "presence_penalty", "top_logprobs"}
# OpenAI parameters this server understands but cannot honour: a clear 400, not "unrecognized".
_TOOLS = ("tools", "tool_choice", "functions", "function_call")
_KNOWN = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
          "stream", "n", "logprobs", "response_format"} | _IGNORED | set(_TOOLS)


class APIError(Exception):
    """An error response: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.extra = extra or {}  # more fields of the error object (Azure's status, innererror)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass
class ChatRequest:
    messages: list  # [{"role", "content"[, "name"]}], roles normalised, content plain text
    max_tokens: int | None = None  # None: the server's default
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


def _number(body: dict, key: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"{key} must be a number, got {json.dumps(value)}", key, "invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise invalid(f"{key} must be in {bracket}{lo:g}, {hi:g}], got {value}", key)
    return float(value)


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text is understood here
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{where}.content[{i}]: only text parts are supported, got {kind!r}",
                              f"{where}.content[{i}]", "unsupported_content")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content", "invalid_type")


def parse_chat_request(body, max_tokens_limit: int) -> ChatRequest:
    """Validate a decoded JSON body; raise APIError (400) naming the offending parameter."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0], "unknown_parameter")
    for key in _TOOLS:
        if body.get(key) not in (None, [], "none"):
            raise invalid(f"{key} is not supported by this model: it was fine-tuned for chat without tool calling; "
                          "send plain messages", key, "unsupported_parameter")
    messages = body.get("messages")
    if messages is None:
        raise invalid("Missing required parameter: 'messages'", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise invalid("messages must be an array of message objects", "messages", "invalid_type")
    if not messages:
        raise invalid("messages must contain at least one message", "messages", "empty_array")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(f"{where} must be an object", where, "invalid_type")
        role = msg.get("role")
        if not isinstance(role, str):
            raise invalid(f"{where}.role is missing", f"{where}.role", "missing_required_parameter")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise invalid(f"{where}.role {json.dumps(msg.get('role'))} is not supported "
                          f"(supported: {', '.join(ROLES)})", f"{where}.role", "invalid_role")
        if msg.get("tool_calls") or msg.get("function_call"):
            raise invalid(f"{where}: tool calls are not supported", f"{where}.tool_calls", "unsupported_parameter")
        if "content" not in msg or msg["content"] is None:
            raise invalid(f"{where}.content is missing", f"{where}.content", "missing_required_parameter")
        item = {"role": role, "content": _text(msg["content"], where)}
        if isinstance(msg.get("name"), str):
            item["name"] = msg["name"]
        out.append(item)

    n = body.get("n")
    if n is not None and n != 1:
        raise invalid("only n=1 is supported", "n", "unsupported_value")
    if body.get("logprobs"):
        raise invalid("logprobs are not supported", "logprobs", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise invalid("only response_format {\"type\": \"text\"} is supported", "response_format", "unsupported_value")

    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise invalid(f"{key} must be an integer, got {json.dumps(max_tokens)}", key, "invalid_type")
        if not 1 <= max_tokens <= max_tokens_limit:
            raise invalid(f"{key} must be between 1 and {max_tokens_limit}, got {max_tokens}", key)

    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise invalid("stop must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise invalid(f"stop takes at most {MAX_STOP} sequences, got {len(stops)}", "stop")

    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
        raise invalid(f"seed must be an integer, got {json.dumps(seed)}", "seed", "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise invalid(f"stream must be a boolean, got {json.dumps(stream)}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options", "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a string", "model", "invalid_type")
    return ChatRequest(
        messages=out,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        stop=stops,
        seed=None if seed is None else int(seed) % 2**63,  # torch takes a 63-bit seed
        stream=bool(stream),
        include_usage=bool(options.get("include_usage")),
        model=model,
    )
