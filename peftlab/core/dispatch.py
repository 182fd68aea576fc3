"""One dispatcher per hooked module: it applies the active deltas of every adapter placed there.

The dispatcher owns the module's two hooks (a forward pre-hook for input sites, a forward hook for
parallel and output sites). The module itself is never modified (DESIGN.md principle 1).

Composition: the active adapters (a list of names, or a tree of blocks: ``core/composition.py``)
are compiled once per state version into a plan of three steps (input, parallel, output); with a
list, parallel deltas are summed, then output deltas are applied in activation order. A call only
runs the plan's steps. With per-row routing (a mixed batch), row i uses only the adapter in
its slot; a delta class may implement ``forward_routed`` to do this as one gathered batched matmul,
otherwise the dispatcher runs one sub-batch per adapter.

The deltas follow their module: when the user moves or casts the base model, the next call moves or
casts this module's deltas, or raises a clear error (``core/follow.py``).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.core.composition import Plan, compile_plan
from peftlab.core.delta import Delta
from peftlab.core.follow import BaseRef, follow
from peftlab.core.layers import is_adaptable_layer


@dataclass
class Routing:
    """Per-row adapters: ``slot[i]`` indexes ``names`` (-1: the base model alone)."""

    names: list[str]
    slot: torch.Tensor


_UNSET = object()


@dataclass
class AdapterState:
    """What is active, shared by the container and all its dispatchers.

    ``routing`` (the per-row adapters of the call in progress) belongs to the call, not to the
    model: it is held in a :class:`contextvars.ContextVar`, so calls in several threads (or asyncio
    tasks) each see their own. A thread that never set it (autograd's worker thread re-running a
    checkpointed layer in backward) sees the routing the last checkpointed training call kept
    (:meth:`keep_for_backward`)."""

    active: list[str] = field(default_factory=list)
    #: The active tree of blocks (``core/composition.py``), or None: ``active`` combined as a list.
    composition: Any = None
    merged: list[str] = field(default_factory=list)
    disabled: bool = False
    version: int = 0
    _routing: ContextVar = field(default_factory=lambda: ContextVar("peftlab_routing", default=_UNSET),
                                 repr=False, compare=False)
    _kept: Routing | None = field(default=None, repr=False, compare=False)

    @property
    def routing(self) -> Routing | None:
        """The per-row routing of the current call (this thread's / task's), or None."""
        value = self._routing.get()
        return self._kept if value is _UNSET else value

    @routing.setter
    def routing(self, value: Routing | None) -> None:
        self._routing.set(value)

    def keep_for_backward(self, routing: Routing) -> None:
        """Keep ``routing`` for threads that never set one: a checkpointed training step's backward
        re-runs the hooks, possibly in autograd's own thread, after the call returned."""
        self._kept = routing

    def touch(self) -> None:
        self.version += 1

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: a call's routing is not copied
        return {k: v for k, v in self.__dict__.items() if k not in ("_routing", "_kept")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _routing=ContextVar("peftlab_routing", default=_UNSET), _kept=None)


def _split_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    """The module's main input and a function that puts a replacement back."""
    if args:
        return args[0], lambda new: ((new, *args[1:]), kwargs)
    for key in ("input", "hidden_states", "x", "input_ids"):
        if key in kwargs:
            return kwargs[key], lambda new, key=key: (args, {**kwargs, key: new})
    raise RuntimeError("hooked module was called without a tensor input")


class Dispatcher:
    """One per hooked module: holds every adapter's deltas there and applies the active ones (or
    each row's own, for a mixed batch) through a forward pre-hook and a forward hook."""
    def __init__(self, name: str, module: nn.Module, state: AdapterState):
        self.name = name
        self.module = module
        self.state = state
        self.deltas: dict[str, list[Delta]] = {}
        # (state version, plan) and (routing, state version, {site: slots}): each one tuple, replaced
        # whole, so calls in several threads never see one's key with another's value.
        self._plan_entry: tuple[int, Plan] = (-1, Plan())
        self._slots_entry: tuple[Routing | None, int, dict[str, list[list[Delta]]]] = (None, -1, {})
        # In-place addition is safe only on the fresh output of a plain layer, and only without autograd.
        self._inplace_ok = is_adaptable_layer(module)
        # The module's device and dtype, read at each call from one tensor (core/follow.py).
        self._base = BaseRef(module)
        self._mode: bool | None = None  # the base module's training flag the deltas were last set to
        self._handles = [
            module.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            module.register_forward_hook(self._post_hook, with_kwargs=True),
        ]

    # -- bookkeeping ----------------------------------------------------------------------------
    def add(self, adapter: str, delta: Delta) -> None:
        self.deltas.setdefault(adapter, []).append(delta)
        self._mode = None  # the new delta takes the base module's mode at the next call
        self.state.touch()

    def remove(self, adapter: str) -> None:
        self.deltas.pop(adapter, None)
        self.state.touch()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def follow_base(self, in_use: bool | None = None) -> None:
        """Move or cast this module's deltas if the base module was moved or cast since the last
        check (``core/follow.py``); ``in_use``: whether a call is about to use them (default: any
        is active or routed here)."""
        if not self._base.changed():
            return
        if in_use is None:
            in_use = self.state.routing is not None or not self._plan().empty
        follow([d for ds in self.deltas.values() for d in ds], self._base, f"module {self.name!r}", in_use)

    def _plan(self) -> Plan:
        """The active composition compiled for this module (cached per state version)."""
        st = self.state
        version, plan = self._plan_entry
        if version != st.version:
            version = st.version
            if st.disabled:
                plan = Plan()
            else:
                plan = compile_plan(
                    st.composition if st.composition is not None else st.active,
                    lambda a: () if a in st.merged else self.deltas.get(a, ()),
                )
            self._plan_entry = (version, plan)
        return plan

    def _slots(self, site: str) -> list[list[Delta]]:
        """Per routed adapter name, this module's deltas of ``site`` (cached per routing and state)."""
        routing = self.state.routing
        entry = self._slots_entry
        if entry[0] is not routing or entry[1] != self.state.version:
            entry = self._slots_entry = (routing, self.state.version, {})
        cache = entry[2]
        if site not in cache:
            cache[site] = [
                [d for d in self.deltas.get(n, ()) if d.site == site] for n in routing.names  # type: ignore[union-attr]
            ]
        return cache[site]

    # -- hooks ----------------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._base.changed():  # one tensor's device and dtype: the only per-call cost of following
            self.follow_base()
        if self._mode is not module.training:
            # The deltas are in the mode of the module they are attached to, so ``model.eval()`` on
            # the user's own object turns off adapter dropout and rank sampling too.
            for ds in self.deltas.values():
                for d in ds:
                    d.train(module.training)
            self._mode = module.training
        if self.state.routing is not None:
            slots = self._slots("input")
            if not any(slots):
                return None
            x, put = _split_input(args, kwargs)
            return put(_routed_sequential(slots, self.state.routing.slot, x, None, input_site=True))
        step = self._plan().input
        if step is None:
            return None
        x, put = _split_input(args, kwargs)
        return put(step(x, x, kwargs))

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        y = output[0] if isinstance(output, tuple) else output
        if self.state.routing is not None:
            new_y = self._routed(args, kwargs, y)
        else:
            plan = self._plan()
            if plan.parallel is None and plan.output is None:
                return None
            x, _ = _split_input(args, kwargs)
            new_y = y
            if plan.parallel is not None:
                if self._inplace_ok and not torch.is_grad_enabled():
                    new_y = y.add_(plan.parallel(x, y))
                elif isinstance(plan.parallel, Delta):  # a lone delta may compute y + Δ its own way
                    new_y = plan.parallel.plus(x, y)
                else:
                    new_y = y + plan.parallel(x, y)
            if plan.output is not None:
                new_y = plan.output(x, new_y, kwargs)
        if new_y is None:
            return None
        return (new_y, *output[1:]) if isinstance(output, tuple) else new_y

    def _routed(self, args: tuple, kwargs: dict, y: torch.Tensor) -> torch.Tensor | None:
        routing = self.state.routing
        assert routing is not None
        par, out = self._slots("parallel"), self._slots("output")
        if not any(par) and not any(out):
            return None
        x, _ = _split_input(args, kwargs)
        slot = routing.slot
        if slot.shape[0] != y.shape[0]:
            raise ValueError(
                f"adapter_names gives {slot.shape[0]} rows but module {self.name!r} sees a batch of {y.shape[0]}"
            )
        new_y = y
        if any(par):
            new_y = y + _routed_parallel(par, slot, x, y)
        if any(out):
            new_y = _routed_sequential(out, slot, x, new_y, input_site=False, call=kwargs)
        return new_y


def _routed_parallel(slots: list[list[Delta]], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ of each row's own parallel deltas: batched when the delta class allows, else per adapter."""
    singles = [s[0] if s else None for s in slots]
    present = [d for d in singles if d is not None]
    if all(len(s) <= 1 for s in slots) and present:
        # The delta class decides whether it can batch this mix (it returns None when it cannot).
        fast = type(present[0]).forward_routed(singles, slot, x, y)
        if fast is not None:
            return fast
    total = torch.zeros_like(y)
    for k, deltas in enumerate(slots):
        rows = (slot == k).nonzero().squeeze(1)
        if not deltas or rows.numel() == 0:
            continue
        xs, ys = x.index_select(0, rows), y.index_select(0, rows)
        part = sum(d(xs, ys) for d in deltas)
        total = total.index_add(0, rows, part)  # type: ignore[arg-type]
    return total


def _call_rows(call: dict, rows: torch.Tensor, batch: int) -> dict:
    """A module call's keyword arguments for a sub-batch: tensors (also inside tuples) whose first
    dimension is the batch keep only ``rows``; everything else is passed as it is."""
    def pick(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v.index_select(0, rows)
        return tuple(pick(t) for t in v) if isinstance(v, tuple) else v

    return {k: pick(v) for k, v in call.items()}


def _routed_sequential(
    slots: list[list[Delta]], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, input_site: bool,
    call: dict | None = None,
) -> torch.Tensor:
    """Each row through its own input- or output-site deltas: batched when the delta class allows,
    else one sub-batch per adapter (``call``: the module's keyword arguments, for deltas that read them)."""
    target = x if input_site else y
    assert target is not None
    singles = [s[0] if s else None for s in slots]
    present = [d for d in singles if d is not None]
    batched = getattr(type(present[0]), "forward_routed", None) if present else None
    if batched and all(len(s) <= 1 for s in slots) and all(type(d) is type(present[0]) for d in present):
        extra = (call,) if getattr(present[0], "reads_call", False) else ()  # forward_routed(..., call)
        fast = batched(singles, slot, x, None if input_site else y, *extra)
        if fast is not None:
            return fast
    result = target
    for k, deltas in enumerate(slots):
        rows = (slot == k).nonzero().squeeze(1)
        if not deltas or rows.numel() == 0:
            continue
        part = target.index_select(0, rows)
        xs = x.index_select(0, rows)
        reads = [getattr(d, "reads_call", False) for d in deltas]
        sub = _call_rows(call or {}, rows, slot.shape[0]) if any(reads) else None
        for d, r in zip(deltas, reads):
            part = d(part) if input_site else d(xs, part, call=sub) if r else d(xs, part)
        result = result.index_copy(0, rows, part)
    return result
