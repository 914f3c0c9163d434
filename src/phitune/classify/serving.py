"""The endpoint of a classification model: POST /v1/classifications, and chat answering 400.

    POST /v1/classifications   {"model": ID (optional), "input": TEXT | MESSAGES | [TEXT | MESSAGES, ...]}
    -> {"id", "object": "list", "model", "data": [{"index", "label", "scores": {label: probability}}],
        "usage": {"prompt_tokens", "total_tokens"}}

Behind the same API key (phitune.serving.auth) and prompt content filter as chat; errors
have OpenAI's shape (phitune.serving.schemas.APIError). A messages list is one input; a
list whose items are texts or messages lists is several.
"""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from phitune.errors import PhituneError
from phitune.serving.schemas import APIError

MAX_INPUTS = 256  # per request


class NoGeneration:
    """What the chat engine holds for a classifier: its context, and nothing to generate."""

    def __init__(self, context_length: int):
        self.context_length = int(context_length)


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def parse_inputs(body) -> tuple[list, object]:
    """(inputs, model) of a request body; APIError 400 saying what is wrong otherwise."""
    from phitune.classify.predict import as_messages

    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", "invalid_request_error", None, "invalid_type")
    if "input" not in body:
        raise APIError(400, "'input' is required: a text, a messages list, or a list of them.",
                       "invalid_request_error", "input", "missing_required_parameter")
    raw = body["input"]
    items = [raw] if isinstance(raw, str) or _is_messages(raw) else raw
    if not isinstance(items, list) or not items:
        raise APIError(400, "'input' must be a text, a messages list, or a non-empty list of them.",
                       "invalid_request_error", "input", "invalid_type")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"'input' has {len(items)} items; at most {MAX_INPUTS} per request.",
                       "invalid_request_error", "input", "too_many_inputs")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(as_messages(item, f"input[{i}]" if items is not raw or len(items) > 1 else "input"))
        except PhituneError as exc:
            raise APIError(400, f"{exc}.", "invalid_request_error", "input", "invalid_value") from None
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string.", "invalid_request_error", "model", "invalid_type")
    return out, model


def add_routes(app, service, classifier) -> None:
    """POST /v1/classifications on `classifier` (phitune.classify.predict.Classifier); chat -> 400."""
    from phitune.serving.app import _require_json, _unknown_model, parse_json, read_body

    async def classifications(request: Request):
        _require_json(request)
        inputs, model = parse_inputs(parse_json(await read_body(request, service.settings.max_body_bytes)))
        if model is not None and model != service.model_id:
            raise _unknown_model(model, service.model_id)
        for messages in inputs:
            await service._screen_prompt(messages)  # the same prompt filter as chat: 400 content_filter
        data, tokens = await asyncio.to_thread(classifier.classify, inputs)
        return JSONResponse({"id": f"clf-{uuid.uuid4().hex[:24]}", "object": "list", "created": int(time.time()),
                             "model": service.model_id,
                             "data": [dict(d, index=i, object="classification") for i, d in enumerate(data)],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def chat_completions(request: Request):
        raise APIError(400, f"The model '{service.model_id}' is a classifier (labels: {', '.join(classifier.labels)}); "
                            "it does not chat. Use POST /v1/classifications with {\"input\": ...}.",
                       "invalid_request_error", "model", "model_is_classifier")

    app.add_api_route("/v1/classifications", classifications, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])


def load_classifier(source, device: str = "cpu"):
    """The Classifier of a resolved model (phitune.models.uri.ModelSource), or None for a chat model."""
    from pathlib import Path

    if not source.adapter_dir or not (Path(source.adapter_dir) / "labels.json").is_file():
        return None
    from phitune.classify.predict import Classifier

    return Classifier.load(source.base_ref, source.adapter_dir, device)
