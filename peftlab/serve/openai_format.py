"""OpenAI's response shapes: completion and chat bodies, their streamed chunks (server-sent events
ending with ``data: [DONE]``), the model list and the error body."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from .openai_api import now
from .requests import GenerationResult

#: What ``/v1/completions`` and ``/v1/chat/completions`` return, per route.
KINDS = {
    "completion": {"prefix": "cmpl-", "object": "text_completion", "chunk": "text_completion"},
    "chat": {"prefix": "chatcmpl-", "object": "chat.completion", "chunk": "chat.completion.chunk"},
}

#: The error ``type`` OpenAI's API gives for each status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def new_id(kind: str) -> str:
    """A response id in OpenAI's style (``cmpl-...`` or ``chatcmpl-...``)."""
    return KINDS[kind]["prefix"] + uuid.uuid4().hex


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def usage_of(prompt_tokens: int, results: Sequence[GenerationResult]) -> dict[str, int]:
    """``usage``: ``prompt_tokens`` (each prompt once), the generated tokens of every choice, their sum."""
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _choice(kind: str, index: int, text: str, finish_reason: str | None, delta: bool, first: bool = False) -> dict[str, Any]:
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if not delta:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    content: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish_reason}


def response_body(kind: str, response_id: str, model: str, results: Sequence[GenerationResult],
                  prompt_tokens: int) -> dict[str, Any]:
    """The whole (non-streamed) response: one choice per result, in order, and the usage."""
    return {"id": response_id, "object": KINDS[kind]["object"], "created": now(), "model": model,
            "choices": [_choice(kind, i, r.text, r.finish_reason, delta=False) for i, r in enumerate(results)],
            "usage": usage_of(prompt_tokens, results)}


def chunk(kind: str, response_id: str, model: str, index: int, text: str, finish_reason: str | None = None,
          first: bool = False) -> dict[str, Any]:
    """One streamed chunk of choice ``index``: new text, and ``finish_reason`` on its last chunk. A
    chat stream's first chunk of a choice carries ``role: assistant``."""
    return {"id": response_id, "object": KINDS[kind]["chunk"], "created": now(), "model": model,
            "choices": [_choice(kind, index, text, finish_reason, delta=True, first=first)]}


def usage_chunk(kind: str, response_id: str, model: str, usage_counts: dict[str, int]) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {"id": response_id, "object": KINDS[kind]["chunk"], "created": now(), "model": model, "choices": [],
            "usage": usage_counts}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line (``data: [DONE]`` for the end)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def model_list(base_name: str, adapters: Sequence[str], created: int) -> dict[str, Any]:
    """``GET /v1/models``: the base model, then each adapter with the base as its ``parent`` (vLLM's
    layout)."""
    base = {"id": base_name, "object": "model", "created": created, "owned_by": "peftlab", "root": base_name,
            "parent": None}
    return {"object": "list",
            "data": [base, *({"id": name, "object": "model", "created": created, "owned_by": "peftlab",
                              "root": name, "parent": base_name} for name in adapters)]}
