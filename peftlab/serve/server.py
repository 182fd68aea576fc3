"""The OpenAI-compatible HTTP server over an :class:`~peftlab.serve.engine.Engine` (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream by server-sent events
with ``"stream": true``), ``GET /v1/models``, ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (vLLM's bodies), ``GET /health``, ``GET /metrics`` (Prometheus).
The ``model`` field names the adapter, or the base model's name for none.

Every error is a JSON body in OpenAI's shape with the right status (:func:`error_response`): the
engine's errors carry their own (unknown adapter 404, full queue 429 with ``Retry-After``, prompt
too long or a bad adapter or field 400), a malformed body is a 400 naming the field, and with an API
key every route but ``/health`` answers 401 without ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from . import openai_format as fmt
from .async_handles import HandleEvents
from .errors import PromptTooLongError, QueueFullError, ServeError, UnknownAdapterError
from .metrics import ServerMetrics, render
from .openai_api import (ChatCompletionRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest, chat_prompt,
                         completion_prompts, generation_requests, now)
from .requests import GenerationRequest, GenerationResult, RequestHandle, TokenEvent

logger = logging.getLogger("peftlab.serve")

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter", "/health", "/metrics")
#: OpenAI's error ``code`` for the engine's errors.
ERROR_CODES = {UnknownAdapterError: "model_not_found", QueueFullError: "queue_full",
               PromptTooLongError: "context_length_exceeded"}


# -- errors ----------------------------------------------------------------------------------------
def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error in OpenAI's shape."""
    return JSONResponse(fmt.error_body(status, message, param, code), status_code=status, headers=headers)


def serve_error_response(err: ServeError, path: str = "") -> JSONResponse:
    """The response for an engine error: its own status, its field as ``param`` (the engine's
    ``prompt_ids`` is the route's ``prompt`` or ``messages``), ``Retry-After`` on a full queue."""
    param = getattr(err, "field", None) or None
    if param == "prompt_ids":
        param = "messages" if path.endswith("/chat/completions") else "prompt"
    headers = {"Retry-After": str(max(1, math.ceil(err.retry_after)))} if isinstance(err, QueueFullError) else None
    code = next((c for kind, c in ERROR_CODES.items() if isinstance(err, kind)), None)
    return error_response(err.http_status, str(err), param, code, headers)


def _validation_response(err: RequestValidationError) -> JSONResponse:
    """A 400 naming the first bad field (``messages.0.role``), or saying that the JSON is malformed."""
    errors = err.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg', ''))}; "
                                   "send a JSON object with Content-Type: application/json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # a union (str | list[...]) reports the member type tried last; its field name is what matters
    loc = [part for part in loc if not part.startswith(("list[", "str", "int", "dict["))] or loc
    field = ".".join(loc)
    if not field:
        return error_response(400, f"request body: {first.get('msg', 'invalid')}: expected a JSON object")
    got = f" (got {first['input']!r})" if first.get("type") != "missing" and "input" in first else ""
    more = f"; {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return error_response(400, f"field {field!r}: {first.get('msg', 'invalid value')}{got}{more}", param=field)


# -- API key and request counting (pure ASGI, so streamed responses pass through untouched) ----------
class GuardAndCount:
    """With ``api_key``, answer 401 to every route but ``/health`` lacking ``Authorization: Bearer
    <key>`` (compared in constant time); count every response by route and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        """Wrap ``app``."""
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key, run the app, count the status."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
            self.metrics.count_request(route, 401)
            response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        status = 500

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_request(route, status)


# -- generation ------------------------------------------------------------------------------------
def submit_all(engine: Any, requests: Sequence[GenerationRequest]) -> list[RequestHandle]:
    """Submit every request, or none: if one is refused, cancel those already in and re-raise."""
    handles: list[RequestHandle] = []
    try:
        for request in requests:
            handles.append(engine.submit(request))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


class Generation:
    """One call of a generation route: its requests submitted to the engine, answered whole or as a
    stream of OpenAI chunks."""

    def __init__(self, kind: str, body: Any, prompts: list[list[int]], handles: list[RequestHandle],
                 metrics: ServerMetrics) -> None:
        """``kind`` is ``"completion"`` or ``"chat"``; ``handles`` come prompt-major, ``n`` per prompt."""
        self.kind, self.body, self.metrics = kind, body, metrics
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.events = HandleEvents(handles)
        self.id = fmt.new_id(kind)

    def _count(self, result: GenerationResult) -> None:
        self.metrics.count_generation(result.prompt_tokens, result.completion_tokens, result.first_token_s, result.total_s)

    async def response(self) -> JSONResponse:
        """Wait for every choice; the whole OpenAI response."""
        try:
            results = await self.events.results()
        finally:
            self.events.cancel()
        for result in results:
            self._count(result)
        return JSONResponse(fmt.response_body(self.kind, self.id, self.body.model, results, self.prompt_tokens))

    async def chunks(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per new text (a chat choice opens with its role), a last chunk
        per choice with its ``finish_reason``, the usage if asked, then ``data: [DONE]``. An error
        after the stream began is sent as an error event; a client that goes away cancels the rest."""
        model, results = self.body.model, []
        try:
            if self.kind == "chat":
                for index in range(len(self.events.handles)):
                    yield fmt.sse(fmt.chunk(self.kind, self.id, model, index, "", first=True))
            async for index, item in self.events:
                if isinstance(item, TokenEvent):
                    if item.text:
                        yield fmt.sse(fmt.chunk(self.kind, self.id, model, index, item.text))
                else:
                    results.append(item)
                    self._count(item)
                    yield fmt.sse(fmt.chunk(self.kind, self.id, model, index, "", finish_reason=item.finish_reason))
            if self.body.include_usage():
                yield fmt.sse(fmt.usage_chunk(self.kind, self.id, model, fmt.usage_of(self.prompt_tokens, results)))
        except ServeError as err:
            yield fmt.sse(fmt.error_body(err.http_status, str(err)))
        finally:
            self.events.cancel()
        yield fmt.sse("[DONE]")

    def streaming_response(self) -> StreamingResponse:
        """The chunks as a ``text/event-stream`` response."""
        return StreamingResponse(self.chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- the app ---------------------------------------------------------------------------------------
def create_app(engine: Any, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``engine`` (started by the caller, which also stops it).

    ``api_key``: when set, every route but ``/health`` requires ``Authorization: Bearer <api_key>``.
    """
    app = FastAPI(title="peftlab serve", summary="OpenAI-compatible server for many adapters over one base model",
                  docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics()
    created = now()
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(GuardAndCount, api_key=api_key or None, metrics=metrics)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError) -> JSONResponse:
        return serve_error_response(err, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}; routes: {', '.join(ROUTES)}" \
            if err.status_code in (404, 405) else str(err.detail)
        return error_response(err.status_code, message, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(err).__name__}: {err}")

    async def generate(kind: str, body: Any, prompts_of: Callable[[Any, Any], list[list[int]]]) -> Any:
        def prepare() -> tuple[list[list[int]], list[RequestHandle]]:
            # tokenizing and submitting may take a moment (a long prompt, an adapter read from disk):
            # off the event loop
            prompts = prompts_of(body, engine.tokenizer)
            requests = generation_requests(body, prompts, engine.base_name, engine.max_context)
            return prompts, submit_all(engine, requests)

        prompts, handles = await anyio.to_thread.run_sync(prepare)
        call = Generation(kind, body, prompts, handles, metrics)
        return call.streaming_response() if body.stream else await call.response()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await generate("completion", body, completion_prompts)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        return await generate("chat", body, lambda b, tok: [chat_prompt(b, tok)])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return fmt.model_list(engine.base_name, engine.adapter_names(), created)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest) -> PlainTextResponse:
        await anyio.to_thread.run_sync(engine.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest) -> PlainTextResponse:
        await anyio.to_thread.run_sync(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = render(engine.stats(), metrics, len(engine.adapter_names()))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
