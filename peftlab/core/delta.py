"""The delta: the small module a method places at a site of one base module (DESIGN.md principle 2).

Site kinds and what ``forward`` computes (x is the hooked module's input, y its output):

    parallel   y <- y + delta(x, y)          LoRA family, BitFit's bias delta, parallel adapters
    output     y <- delta(x, y)              sequential adapters, (IA)^3 on keys/values, head copies
    input      x <- delta(x)                 (IA)^3 on the FFN's second projection
    model      model inputs rewritten         prefix / prompt tuning (see ``ModelDelta``)

A delta that can be folded into the base weights implements ``delta_params``; merge, unmerge and
merge-and-unload are then done once, generically, by the container.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from peftlab.core.quantized import logical_numel


class Delta(nn.Module):
    """Base class of every placed delta."""

    site: ClassVar[str] = "parallel"
    #: The base parameters (by attribute name) that merging writes, or () if it cannot merge.
    merges_into: ClassVar[tuple[str, ...]] = ()
    #: True when ΔW is a function of W0 (DoRA, (IA)^3): unmerge then subtracts the ΔW kept at merge.
    merge_uses_base: ClassVar[bool] = False
    #: Output sites: True when ``forward`` also takes ``call=`` (and ``forward_routed`` a fifth
    #: argument ``call``): the keyword arguments the hooked module was called with (e.g. the rotary
    #: ``position_embeddings`` a Llama self-attention receives: LLaMA-Adapter). For a sub-batch,
    #: tensors whose first dimension is the batch are given the sub-batch's rows.
    reads_call: ClassVar[bool] = False
    #: Parallel and output sites: False when ``forward`` reads only the dtype of ``y``, never its values
    #: (it then accepts ``y=None``); split training sends y across its transport only when True.
    reads_output: ClassVar[bool] = True

    @property
    def mergeable(self) -> bool:
        return bool(self.merges_into)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def plus(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Parallel site: y + Δ(x, y), used by the dispatcher when this delta is the only one acting
        at its module. A delta may compute the sum its own way when that is cheaper (LNFit: the
        norm once with γ0 + Δγ), equal to ``y + self(x, y)`` up to rounding."""
        return y + self(x, y)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔP for each name in ``merges_into``, in the base parameter's own layout, such that the
        base with ``P + ΔP`` computes what base-plus-delta computes."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def rank(self) -> int | None:
        """Rank (upper bound) of ΔW, where a weight delta exists."""
        return None

    def changed_params(self, base: nn.Module) -> int:
        """Entries of the base model this delta changes: the base tensors merging writes, or, for a
        delta that cannot merge, the parameters it adds (seed 001 §12's "changed parameters")."""
        if self.merges_into:
            return sum(logical_numel(getattr(base, n)) for n in self.merges_into if getattr(base, n, None) is not None)
        return sum(p.numel() for p in self.parameters())

    def file_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed by their name relative to the base module (PEFT's layout)."""
        return dict(self.state_dict())

    def load_file_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`file_state` saved; every key and shape must match exactly."""
        own = self.file_state()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"missing keys {missing}, unexpected keys {unexpected}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{k}: file has shape {tuple(v.shape)}, this base needs {tuple(own[k].shape)}")
        self._load_checked(state)

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence["Delta | None"], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Per-row adapters in one batched computation.

        ``deltas[k]`` serves the rows where ``slot == k`` (``None``: no delta for that slot); rows
        with ``slot == -1`` use the base. Return, for the whole batch, what the site computes:
        parallel: the Δ to add to y; output: the new y; input (``y`` is None): the new x. Return
        ``None`` to let the dispatcher fall back to one sub-batch per adapter.
        """
        return None


def per_row(values: Sequence[torch.Tensor | None], slot: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Row i gets ``values[slot[i]]``, or ``fill`` where ``slot[i] == -1`` or the value is None:
    one gather from the (K + 1, ...) stack [fill; values]. Shapes must agree (pad ranks first)."""
    stacked = torch.stack([fill] + [fill if v is None else v for v in values])
    return stacked.index_select(0, slot + 1)


class RecentCache:
    """A dict that keeps only its ``size`` most recently used entries (caches of stacked or
    gathered adapter weights for mixed batches: a server alternates between a few routings).
    Safe to share between threads (calls of one model in flight at once)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        """The value for ``key`` (marking it most recent), or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: Any, value: Any) -> None:
        """Store ``value``; the least recently used entry goes when over ``size``."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: a lock cannot be copied
        return {"size": self.size, "_items": OrderedDict(self._items)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def broadcast_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View per-row features (batch, n) so they broadcast over ``like`` = (batch, ..., n)."""
    return rows.view(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[-1])


class ModelDelta(nn.Module):
    """A model-site delta: it rewrites the model's call (embeddings, key/value prefixes...)."""

    site: ClassVar[str] = "model"
    merges_into: ClassVar[tuple[str, ...]] = ()

    @property
    def mergeable(self) -> bool:
        return False

    def prepare(self, model: nn.Module, kwargs: dict[str, Any], generating: bool = False) -> dict[str, Any]:
        """Return the keyword arguments the base model is called with."""
        raise NotImplementedError

    @classmethod
    def prepare_routed(
        cls, slots: Sequence[Sequence["ModelDelta"]], slot: torch.Tensor, model: nn.Module,
        kwargs: dict[str, Any], generating: bool,
    ) -> dict[str, Any]:
        """A mixed batch: row i is prepared by the deltas in ``slots[slot[i]]`` (none where -1).
        Only methods registered with ``per_row=True`` are routed here."""
        raise NotImplementedError(f"{cls.__name__} does not batch per row")

    def rank(self) -> int | None:
        return None

    def changed_params(self, base: nn.Module) -> int:
        return sum(p.numel() for p in self.parameters())

    def file_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    load_file_state = Delta.load_file_state
    _load_checked = Delta._load_checked


#: The hook tables of an ``nn.Module`` (forward, forward-pre and backward hooks and their flags).
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def copy_without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in which neither it nor its submodules carry hooks.

    A base module that adapters already hook carries a dispatcher's hooks: a copy with them would
    deep-copy the dispatcher and route its own output again (the copy of a second adapter's
    ``modules_to_save`` head then never got a gradient). Hooks on the base module still run, on
    the base module's own call."""
    import copy

    memo: dict[int, Any] = {}
    for m in module.modules():
        for attr in _HOOK_TABLES:
            table = m.__dict__.get(attr)
            if table:
                memo[id(table)] = type(table)()
    return copy.deepcopy(module, memo)


class HeadCopy(Delta):
    """``modules_to_save``: a fully trainable copy of a base module (e.g. a fresh classifier head).

    Output site: y <- copy(x). The base module still runs but its output is replaced, so the base is
    never modified. Saved with the base module's own keys, as Hugging Face PEFT saves them.
    """

    site = "output"
    reads_output = False  # y' = copy(x); y gives only the output dtype

    def __init__(self, base: nn.Module):
        super().__init__()
        self.module = copy_without_hooks(base)
        for p in self.module.parameters():
            p.requires_grad_(True)
        # Merging writes the trained copy's values into the base module's own tensors.
        self.merges_into = tuple(n for n, _ in base.named_parameters(recurse=True))

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        own = dict(self.module.named_parameters())
        return {n: own[n].detach() - p.detach() for n, p in base.named_parameters()}

    def changed_params(self, base: nn.Module) -> int:
        return sum(p.numel() for p in base.parameters())

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """copy(x), computed in the copy's dtype: the copy of a half-precision base stays float32 (as
        every delta does) and its output is cast back to the base output's dtype."""
        w = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        if w is None or not x.is_floating_point() or x.dtype == w.dtype:
            return self.module(x)
        out = self.module(x.to(w.dtype))
        if isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and y.is_floating_point():
            out = out.to(y.dtype)
        return out

    def file_state(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
