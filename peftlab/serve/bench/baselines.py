"""Hugging Face PEFT as a server would use it, for the load benchmark's side-by-side rows.

Both baselines answer the engine's calls (``submit`` -> :class:`~peftlab.serve.requests.RequestHandle`,
``start``, ``stop``, ``stats``) from one generation thread over a bounded FIFO queue, so the same
driver runs them and the engine:

* :class:`PeftSwitching` -- one request at a time: ``set_adapter(name)``, then ``generate`` (greedy).
* :class:`PeftMixedBatch` -- static batches: up to ``max_batch`` waiting requests, left-padded, one
  ``generate(..., adapter_names=[...])`` (PEFT's mixed batch) that runs until its longest request
  is done; no request joins a batch in flight.

A request's first-token and total times come from a streamer that stamps every decode step, so a
short request in a long static batch is counted as done at its own last token.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import torch

from peftlab.serve.errors import InvalidRequestError, QueueFullError, UnknownAdapterError
from peftlab.serve.requests import GenerationRequest, GenerationResult, RequestHandle


class StepClock:
    """A transformers streamer that records the instant of every generated step (the first
    ``put`` is the prompt and is skipped)."""

    def __init__(self) -> None:
        """No step yet."""
        self.steps: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        """Called by ``generate`` with the prompt, then with each step's new tokens."""
        if self._prompt_seen:
            self.steps.append(time.monotonic())
        self._prompt_seen = True

    def end(self) -> None:
        """Called by ``generate`` when it finishes."""


class _GenerationLoop:
    """One thread taking batches from a bounded FIFO queue and answering through handles."""

    def __init__(self, peft_model: Any, tokenizer: Any, adapters: list[str], *, max_batch: int = 32,
                 max_queue: int = 256) -> None:
        """Serve ``adapters`` of ``peft_model`` (a PEFT ``PeftModel``)."""
        self.model, self.tokenizer, self.adapters = peft_model, tokenizer, set(adapters)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._queue: collections.deque[tuple[GenerationRequest, RequestHandle, float]] = collections.deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.done = 0
        self.batch_sizes: list[int] = []

    # -- the engine's interface ------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request`` (greedy only); raises at once for an unknown adapter or a full queue."""
        if request.temperature != 0:
            raise InvalidRequestError("the PEFT baselines decode greedily only (temperature 0)", field="temperature")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {request.adapter!r}")
        handle = RequestHandle(request.request_id)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"queue full ({self.max_queue} requests)", retry_after=1.0)
            self._queue.append((request, handle, time.monotonic()))
            self._cond.notify()
        return handle

    def start(self) -> "_GenerationLoop":
        """Start the generation thread."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the batch in flight; requests still queued fail."""
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        while self._queue:
            self._queue.popleft()[1]._fail(RuntimeError("the baseline stopped"))

    def __enter__(self) -> "_GenerationLoop":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Queue length, finished requests and the mean batch size."""
        mean = sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0
        return {"queue_length": len(self._queue), "requests_done": self.done, "mean_batch_size": mean}

    # -- the loop ----------------------------------------------------------------------------------
    def _take(self) -> list[tuple[GenerationRequest, RequestHandle, float]]:
        with self._cond:
            while self._running and not self._queue:
                self._cond.wait()
            return [self._queue.popleft() for _ in range(min(self.batch_limit(), len(self._queue)))]

    def batch_limit(self) -> int:
        """How many queued requests one generation takes."""
        return self.max_batch

    def _loop(self) -> None:
        while self._running:
            batch = self._take()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                self._generate(batch)
            except Exception as err:  # noqa: BLE001 - every request of the batch learns why
                for _, handle, _ in batch:
                    handle._fail(err)

    def _generate(self, batch: list[tuple[GenerationRequest, RequestHandle, float]]) -> None:
        """Left-pad the prompts, generate greedily to the longest ``max_tokens``, and finish each
        request at its own length (its end-of-sequence token or its ``max_tokens``)."""
        requests = [r for r, _, _ in batch]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests])
        clock = StepClock()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in requests),
                                      do_sample=False, streamer=clock, pad_token_id=self.pad, eos_token_id=self.eos,
                                      **self.route(requests))
        for row, (request, handle, queued_at) in enumerate(batch):
            tokens = out[row, width:].tolist()[: request.max_tokens]
            reason = "length"
            if self.eos in tokens:  # it ends the answer and is not part of it, as in the engine
                tokens, reason = tokens[: tokens.index(self.eos)], "stop"
            steps = clock.steps or [time.monotonic()]
            first, last = steps[0], steps[min(len(tokens) + (reason == "stop"), len(steps)) - 1]
            total = last - queued_at
            handle._finish(GenerationResult(
                request_id=request.request_id, token_ids=tokens, text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                finish_reason=reason, prompt_tokens=len(request.prompt_ids), completion_tokens=len(tokens),
                first_token_s=first - queued_at, total_s=total,
                deadline_missed=request.deadline is not None and last > request.deadline))
            self.done += 1

    def route(self, requests: list[GenerationRequest]) -> dict[str, Any]:
        """Extra ``generate`` arguments that route the batch (set per subclass)."""
        raise NotImplementedError


class PeftSwitching(_GenerationLoop):
    """PEFT switching adapters per request: ``set_adapter`` then a batch-of-one ``generate``."""

    def batch_limit(self) -> int:
        """One request at a time."""
        return 1

    def route(self, requests: list[GenerationRequest]) -> dict[str, Any]:
        """Make the request's adapter the active one (the base model: every adapter disabled)."""
        name = requests[0].adapter
        if name is None:
            raise InvalidRequestError("the PEFT baselines serve adapters only", field="adapter")
        self.model.set_adapter(name)
        return {}


class PeftMixedBatch(_GenerationLoop):
    """PEFT's mixed batch: one static batch, each row through its own adapter (``adapter_names``)."""

    def route(self, requests: list[GenerationRequest]) -> dict[str, Any]:
        """PEFT's per-row routing; ``"__base__"`` is PEFT's name for no adapter."""
        return {"adapter_names": [r.adapter or "__base__" for r in requests]}


def load_peft(model: Any, adapter_dirs: dict[str, str]) -> Any:
    """A PEFT ``PeftModel`` over ``model`` holding every adapter of ``{name: directory}``."""
    from peft import PeftModel

    names = list(adapter_dirs)
    pm = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(adapter_dirs[name], adapter_name=name)
    return pm.eval()
