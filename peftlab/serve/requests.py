"""What a client hands the engine and what it gets back: a request, its streamed tokens, its result,
and the handle that connects them across threads."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import InvalidRequestError, ServeError


@dataclass
class GenerationRequest:
    """One generation: the prompt's token ids, the adapter to route it through (``None`` = the base
    model) and the decoding options.

    ``temperature == 0`` decodes greedily; otherwise tokens are sampled from
    ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose probability
    reaches ``top_p``, with a generator seeded by ``seed`` (so a seeded request is reproducible).
    ``deadline`` is a ``time.monotonic()`` instant; requests with one are scheduled earliest deadline
    first.
    """

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    deadline: float | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def validate(self) -> None:
        """Raise :class:`InvalidRequestError` naming the first field whose value cannot be served."""

        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"field {name!r}: {why}", field=name)

        ids = self.prompt_ids
        if not isinstance(ids, (list, tuple)) or not ids:
            raise bad("prompt_ids", "expected a non-empty list of token ids")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise bad("prompt_ids", "expected non-negative integer token ids")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise bad("adapter", f"expected an adapter name (str) or None, got {type(self.adapter).__name__}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", f"expected an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= float(self.temperature) <= 100.0:
            raise bad("temperature", f"expected a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < float(self.top_p) <= 1.0:
            raise bad("top_p", f"expected a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", f"expected an integer or None, got {self.seed!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "expected a list of non-empty strings")
        if self.deadline is not None and not isinstance(self.deadline, (int, float)):
            raise bad("deadline", f"expected a time.monotonic() instant (float) or None, got {self.deadline!r}")


@dataclass
class TokenEvent:
    """One streamed step: the token id and the new decoded text it adds (stop strings removed)."""

    token_id: int
    text: str


@dataclass
class GenerationResult:
    """A finished generation. ``finish_reason`` is ``"stop"`` (end-of-sequence token or a stop
    string) or ``"length"`` (``max_tokens`` reached, or the model's context is full); times are
    seconds from submission."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float
    total_s: float
    deadline_missed: bool


_DONE = object()


class RequestHandle:
    """The client's side of a submitted request: stream its tokens, wait for its result, or cancel it.

    Every method is thread-safe; the engine's decode loop feeds the handle through :meth:`_emit`,
    :meth:`_finish` and :meth:`_fail`.
    """

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._stream_lock = threading.Lock()

    # --- client side -------------------------------------------------------------------------
    def stream(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Yield each new token as it is decoded, until the request finishes (blocking).

        ``timeout`` bounds the wait for each next token (:class:`TimeoutError` when it passes).
        Raises the request's error if it failed. Several threads may call it; each event goes to
        one of them.
        """
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id}: no token within {timeout} s") from None
            if item is _DONE:
                self._events.put(_DONE)  # let any other streaming thread end too
                if self._error is not None:
                    raise self._error
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes and return its :class:`GenerationResult`.

        Raises :class:`TimeoutError` after ``timeout`` seconds, or the request's error if it failed.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id}: not finished within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Ask the engine to drop the request; it ends at the next decode step with what it has."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """Whether the request has finished (successfully or not)."""
        return self._done.is_set()

    # --- engine side ---------------------------------------------------------------------------
    def _emit(self, event: TokenEvent) -> None:
        self._events.put(event)

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        self._done.set()
        self._events.put(_DONE)

    def _fail(self, error: BaseException) -> None:
        if not isinstance(error, ServeError):
            wrapped = ServeError(f"request {self.request_id} failed: {type(error).__name__}: {error}")
            wrapped.__cause__ = error
            error = wrapped
        self._error = error
        self._done.set()
        self._events.put(_DONE)
