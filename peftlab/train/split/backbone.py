"""The server's half of split training: the frozen model, with a remote call at every adapted module.

The client (``client.py``) holds the adapter; this side holds the model and never its deltas. For
each module the client adapts, a forward hook (and a pre-hook for input sites) sends the module's
input x (and its output y when a delta reads it) to the client and uses what comes back:

    parallel sites only     y' = y + Δ           Δ computed by the client from x (and y)
    output sites            y' = g(x, y)         the client applies its parallel and output deltas
    input sites             x' = g(x)            before the module runs

Each such exchange is a :class:`RemoteCall`, an autograd function: in the backward pass it sends
dL/d(its output) to the client and gets back dL/dx (and dL/dy), so gradients flow through the frozen
model exactly as if the deltas were here, while the client accumulates its parameters' gradients.

A worker thread runs the model; it talks to the transport through two queues (``events`` to the
client, ``answers`` from it), so a forward or backward pass can wait for the client mid-way.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftlab.train.split.wire import Tensors

Message = tuple[dict[str, Any], Tensors]
#: How long the model waits for the client's answer before the step is abandoned.
ANSWER_TIMEOUT_S = 600.0


class SplitError(RuntimeError):
    """A split-training protocol or session error; the message says what went wrong."""


class _Closed(Exception):
    """The session was closed while the model waited for the client."""


class RemoteCall(torch.autograd.Function):
    """out = client(x, y): forward and backward both ask the client (see the module docstring).

    ``anchor`` is a scalar that requires grad, so the output is part of the graph even where x
    (e.g. the output of frozen embeddings) does not require grad."""

    @staticmethod
    def forward(ctx: Any, session: BackboneSession, module: str, phase: str, anchor: torch.Tensor,
                x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Send x (and y) to the client; return its answer on x's device."""
        call = session.ask_forward(module, phase, x, y, grad=anchor.requires_grad)
        ctx.session, ctx.call, ctx.has_y = session, call[0], y is not None
        return call[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        """Send dL/d(out) to the client; return its dL/dx and dL/dy."""
        grads = ctx.session.ask_backward(ctx.call, grad)
        return None, None, None, None, grads.get("x"), grads.get("y") if ctx.has_y else None


class BackboneSession:
    """One client's session over ``model``: hooks on the modules ``spec`` names, a worker thread.

    ``spec``: {module name: {"input": bool, "output": "parallel" | "replace" | None, "needs_y": bool}}.
    :meth:`start` (a forward or backward job) and :meth:`answer` return the next message for the client:
    a ``call`` (the client must answer it), ``done`` or ``error``."""

    def __init__(self, model: nn.Module, spec: dict[str, dict[str, Any]]):
        self.model = model
        self.spec = spec
        self.device = next(model.parameters()).device
        self.events: queue.Queue[Message] = queue.Queue()
        self.answers: queue.Queue[Message | None] = queue.Queue()
        self.jobs: queue.Queue[Callable[[], Tensors] | None] = queue.Queue()
        self.calls = itertools.count()
        self.anchor = torch.zeros(())
        self.graph: torch.Tensor | None = None
        self.handles = []
        for name, want in spec.items():
            module = model.get_submodule(name)
            if want.get("input"):
                self.handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            if want.get("output"):
                self.handles.append(module.register_forward_hook(self._output_hook(name, want)))
        self.worker = threading.Thread(target=self._work, name="split-backbone", daemon=True)
        self.worker.start()

    # -- hooks (run in the worker thread, inside the model's forward) ---------------------------------
    def _input_hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple) -> tuple:
            if not args:
                raise SplitError(f"module {name!r} was called without a positional tensor input")
            return (RemoteCall.apply(self, name, "input", self.anchor, args[0], None), *args[1:])
        return hook

    def _output_hook(self, name: str, want: dict[str, Any]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not args:
                raise SplitError(f"module {name!r} was called without a positional tensor input")
            y = output[0] if isinstance(output, tuple) else output
            out = RemoteCall.apply(self, name, "output", self.anchor, args[0], y if want.get("needs_y") else None)
            new_y = y + out if want["output"] == "parallel" else out
            return (new_y, *output[1:]) if isinstance(output, tuple) else new_y
        return hook

    # -- the client's side of a call (worker thread) ------------------------------------------------
    def _wait(self, call: int) -> Tensors:
        try:
            message = self.answers.get(timeout=ANSWER_TIMEOUT_S)
        except queue.Empty:
            raise SplitError(f"the client did not answer call {call} within {ANSWER_TIMEOUT_S:.0f} s") from None
        if message is None:
            raise _Closed
        header, tensors = message
        if header.get("call") != call:
            raise SplitError(f"the client answered call {header.get('call')} but call {call} was asked")
        return {k: v.to(self.device) for k, v in tensors.items()}

    def ask_forward(self, module: str, phase: str, x: torch.Tensor, y: torch.Tensor | None,
                    grad: bool) -> tuple[int, torch.Tensor]:
        """Send a forward call; returns ``(call id, the client's output)``."""
        call = next(self.calls)
        header = {"kind": "call", "direction": "forward", "call": call, "module": module, "phase": phase,
                  "x_grad": grad and x.requires_grad, "y_grad": grad and y is not None and y.requires_grad}
        self.events.put((header, {"x": x} if y is None else {"x": x, "y": y}))
        answer = self._wait(call)
        if "out" not in answer:
            raise SplitError(f"the client's answer to call {call} ({module}) holds no 'out' tensor")
        return call, answer["out"].to(x.dtype if phase == "input" or y is None else y.dtype)

    def ask_backward(self, call: int, grad: torch.Tensor) -> Tensors:
        """Send dL/d(out) of forward call ``call``; returns the client's {"x": dL/dx, "y": dL/dy} (those it has)."""
        self.events.put(({"kind": "call", "direction": "backward", "call": call}, {"grad": grad}))
        return self._wait(call)

    # -- jobs -----------------------------------------------------------------------------------------
    def forward_job(self, inputs: Tensors, train: bool, grad: bool) -> Callable[[], Tensors]:
        """Run the model on ``inputs``; with ``grad`` keep the graph for :meth:`backward_job`."""
        def job() -> Tensors:
            self.model.train(train)
            self.graph = None
            self.anchor = torch.zeros((), device=self.device, requires_grad=grad)
            with torch.set_grad_enabled(grad):
                logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits
            if grad:
                self.graph = logits
            return {"logits": logits}
        return job

    def backward_job(self, grad: torch.Tensor) -> Callable[[], Tensors]:
        """Back-propagate ``grad`` (dL/dlogits) through the last forward's graph."""
        def job() -> Tensors:
            if self.graph is None:
                raise SplitError("backward without a forward pass with gradients before it")
            graph, self.graph = self.graph, None
            torch.autograd.backward(graph, grad.to(self.device, graph.dtype))
            return {}
        return job

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                self.events.put(({"kind": "done"}, job()))
            except _Closed:
                return
            except Exception as err:  # noqa: BLE001 - every failure goes back to the client as a message
                self.graph = None
                self.events.put(({"kind": "error", "message": f"{type(err).__name__}: {err}"}, {}))

    # -- the transport's side -------------------------------------------------------------------------
    def next_event(self) -> Message:
        """The next message for the client (blocks while the model runs)."""
        try:
            return self.events.get(timeout=ANSWER_TIMEOUT_S)
        except queue.Empty:
            return {"kind": "error", "message": f"the model produced nothing for {ANSWER_TIMEOUT_S:.0f} s"}, {}

    def start(self, job: Callable[[], Tensors]) -> Message:
        """Queue a forward or backward job; returns its first message."""
        self.jobs.put(job)
        return self.next_event()

    def answer(self, header: dict[str, Any], tensors: Tensors) -> Message:
        """Hand the client's answer to the waiting model; returns the next message."""
        self.answers.put((header, tensors))
        return self.next_event()

    def close(self) -> None:
        """Remove the hooks and stop the worker (a pass waiting for the client is abandoned)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.answers.put(None)
        self.jobs.put(None)
