"""The client's half of split training (DLoRA, seed 002 §6.3): the data, the labels and every
trainable PEFT module stay here; the frozen model runs in another process (``backbone.py``).

The split: the server runs the whole frozen model (embeddings, blocks, the frozen head) and asks the
client, at each module the adapter is placed on, for what the adapter's deltas there compute (see
``backbone.py``); the client computes it with its own deltas (the same plan its dispatcher would
run, ``core/composition.compile_plan``), keeps the small autograd graph of each call, and answers the
server's backward calls with dL/dx while its parameters accumulate their gradients. The loss and the
optimizer step run here. What crosses the wire per adapted module and step: x (and y when a delta
reads it), the delta's output, the gradient of that output and dL/dx; plus the input ids once and
the logits and dL/dlogits.

The client places the adapter with :func:`peftlab.apply` on its own copy of the model, so the
adapter is initialised exactly as in local training (and DoRA, PiSSA or BOFT can read the base
weights they need); it never runs that copy's forward.

Not split: methods that rewrite the model's inputs (prompt, prefix: a ``model`` site), deltas that
read the module's call arguments (LLaMA-Adapter) and methods that act during training (AdaLoRA,
DyLoRA), which :func:`check_splittable` refuses by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.core.composition import Plan, compile_plan
from peftlab.core.config import adapter_method, config_parts, parse_method_string
from peftlab.core.delta import Delta
from peftlab.core.model import PeftModel
from peftlab.core.registry import get_method
from peftlab.train.split.backbone import SplitError
from peftlab.train.split.connection import SplitConnection, Traffic
from peftlab.train.split.wire import Tensors

#: Model inputs the client sends (the tokenizer's output).
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class ModulePlan:
    """What the client computes for one adapted module (``mode``: how the server uses the answer)."""

    plan: Plan
    mode: str | None  # "parallel": the answer is Δ, added by the server; "replace": the new output; None
    needs_y: bool

    def compute(self, phase: str, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Input phase: x' = g(x). Output phase: Δ(x, y) (parallel mode) or g(x, y + Δ) (replace mode)."""
        if phase == "input":
            assert self.plan.input is not None
            return self.plan.input(x, x, {})
        if self.mode == "parallel":
            assert self.plan.parallel is not None
            return self.plan.parallel(x, y)  # type: ignore[arg-type]
        assert self.plan.output is not None
        new_y = y if self.plan.parallel is None else y + self.plan.parallel(x, y)  # type: ignore[operator]
        return self.plan.output(x, new_y, {})  # type: ignore[arg-type]

    def wire_spec(self, module: nn.Module) -> dict[str, Any]:
        """What the server needs to hook this module (and to check it is the same module)."""
        weight = getattr(module, "weight", None)
        return {"input": self.plan.input is not None, "output": self.mode, "needs_y": self.needs_y,
                "shape": list(weight.shape) if isinstance(weight, torch.Tensor) else None}


def _check_parts(config: Any) -> None:
    """Refuse a config with a method that declares a ``model`` site or training hooks."""
    for part in config_parts(config):
        name = adapter_method(part)
        spec = get_method(name)
        if "model" in spec.sites:
            raise SplitError(f"{name} rewrites the model's inputs (a model site): split training needs deltas "
                             "placed on modules (lora, dora, ia3, houlsby, bitfit, ...)")
        if spec.training is not None:
            raise SplitError(f"{name} acts during training (its hooks run in the container's training loop); "
                             "split training runs methods without training hooks (lora, dora, ia3, houlsby, ...)")


def check_method(method: str) -> None:
    """Refuse, before anything is loaded, a method string split training cannot run (module docstring)."""
    _check_parts(parse_method_string(method))


def check_splittable(pm: PeftModel, adapter: str) -> None:
    """Refuse an adapter split training cannot run: its methods (:func:`check_method`), and deltas on a
    model site or that read the module's call arguments (LLaMA-Adapter)."""
    _check_parts(pm.configs[adapter])
    for _, module, delta in pm.placements[adapter]:
        if delta.site == "model" or delta.reads_call:
            raise SplitError(f"{type(delta).__name__} on {module!r} rewrites the model's inputs or reads the module's "
                             "call arguments, which do not cross the split; choose a method without them")


def module_plans(pm: PeftModel, adapter: str) -> dict[str, ModulePlan]:
    """One :class:`ModulePlan` per module the adapter is placed on."""
    by_module: dict[str, list[Delta]] = {}
    for _, module, delta in pm.placements[adapter]:
        by_module.setdefault(module, []).append(delta)
    plans = {}
    for module, deltas in by_module.items():
        plan = compile_plan([adapter], lambda _name, ds=deltas: ds)
        mode = "replace" if plan.output is not None else "parallel" if plan.parallel is not None else None
        reads_y = any(d.reads_output for d in deltas if d.site in ("parallel", "output"))
        needs_y = reads_y or (plan.output is not None and plan.parallel is not None)
        plans[module] = ModulePlan(plan, mode, needs_y)
    return plans


class _RemoteModel(torch.autograd.Function):
    """logits = server(inputs): the forward drives the server's forward calls, the backward its backward calls."""

    @staticmethod
    def forward(ctx: Any, client: SplitModel, grad: bool, anchor: torch.Tensor, inputs: Tensors) -> torch.Tensor:
        """Run the model on the server, answering its calls; return the logits."""
        ctx.client = client
        return client.remote_forward(inputs, grad)

    @staticmethod
    def backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[None, None, None, None]:
        """Send dL/dlogits to the server and answer its backward calls (the adapter's .grad fill up)."""
        ctx.client.remote_backward(grad_logits)
        return None, None, None, None


class SplitModel(nn.Module):
    """The client-side model: ``model(**batch)`` returns ``{"logits": ...}`` computed by the server with
    this client's adapter; the loss (from ``labels``) and the optimizer step are the caller's (e.g.
    :class:`~peftlab.train.trainer.Trainer`, which computes cross-entropy or MSE from the logits).

    ``pm`` is the client's :class:`PeftModel`; its adapter ``adapter`` (default: the active one) is the
    one trained. ``task``/``num_labels`` tell the server how to load the model."""

    def __init__(self, pm: PeftModel, connection: SplitConnection, task: str = "classification",
                 num_labels: int | None = None, adapter: str | None = None):
        super().__init__()
        self.pm = pm
        self.connection = connection
        self.adapter = adapter or pm.active_adapter
        if self.adapter is None:
            raise SplitError("the PeftModel has no active adapter to train")
        check_splittable(pm, self.adapter)
        self.plans = module_plans(pm, self.adapter)
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        #: Traffic of training steps (forward and backward with gradients) and of evaluation.
        self.train_traffic = Traffic()
        self.eval_traffic = Traffic()
        spec = {name: plan.wire_spec(pm.model.get_submodule(name)) for name, plan in self.plans.items()}
        self.session, _ = connection.post("/open", {"task": task, "num_labels": num_labels, "modules": spec})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict[str, Any]:
        """The logits of the server's model with this client's adapter (``labels`` stay here: unused)."""
        inputs = {k: v for k, v in zip(INPUT_KEYS, (input_ids, attention_mask, token_type_ids)) if v is not None}
        grad = torch.is_grad_enabled()
        anchor = torch.zeros((), requires_grad=grad)
        logits = _RemoteModel.apply(self, grad, anchor, inputs)
        return {"logits": logits.to(input_ids.device)}

    def _counting(self, grad: bool) -> Traffic:
        return self.train_traffic if grad and self.training else self.eval_traffic

    def _exchange(self, path: str, header: dict[str, Any], tensors: Tensors, grad: bool) -> tuple[dict[str, Any], Tensors]:
        before = self.connection.traffic.copy()
        reply = self.connection.post(path, header, tensors)
        spent = self.connection.traffic.minus(before)
        total = self._counting(grad)
        total.requests += spent.requests
        total.bytes_sent += spent.bytes_sent
        total.bytes_received += spent.bytes_received
        return reply

    def remote_forward(self, inputs: Tensors, grad: bool) -> torch.Tensor:
        """Ask the server for the logits, answering each of its forward calls; keeps each call's graph."""
        self.graphs.clear()
        header, tensors = self._exchange("/forward", {"train": self.training, "grad": grad}, inputs, grad)
        while header["kind"] == "call":
            call = header["call"]
            x, y = tensors["x"], tensors.get("y")
            with torch.set_grad_enabled(grad):
                x.requires_grad_(bool(grad and header["x_grad"]))
                if y is not None:
                    y.requires_grad_(bool(grad and header["y_grad"]))
                out = self.plans[header["module"]].compute(header["phase"], x, y)
            if grad and out.requires_grad:
                self.graphs[call] = (x, y, out)
            header, tensors = self._exchange("/answer", {"call": call}, {"out": out}, grad)
        if header["kind"] != "done" or "logits" not in tensors:
            raise SplitError(f"unexpected reply to a forward pass: {header}")
        return tensors["logits"]

    def remote_backward(self, grad_logits: torch.Tensor) -> None:
        """Send dL/dlogits; for each backward call, back-propagate through that call's graph and return dL/dx, dL/dy."""
        header, tensors = self._exchange("/backward", {}, {"grad": grad_logits}, True)
        while header["kind"] == "call":
            call = header["call"]
            graph = self.graphs.pop(call, None)
            grads: Tensors = {}
            if graph is not None:
                x, y, out = graph
                torch.autograd.backward(out, tensors["grad"].to(out.dtype))
                grads = {k: t.grad for k, t in (("x", x), ("y", y)) if t is not None and t.grad is not None}
            header, tensors = self._exchange("/answer", {"call": call}, grads, True)
        if header["kind"] != "done":
            raise SplitError(f"unexpected reply to a backward pass: {header}")
        self.graphs.clear()

    def close(self) -> None:
        """End the session and the connection."""
        self.connection.close()
