"""Composition blocks: how several active adapters combine (DESIGN.md "Composition is data too").

``pm.set_adapter(Stack("a", Average("b", "c", weights=[0.7, 0.3])))`` activates a tree whose leaves
are adapter names. At every hooked module the tree is compiled once (``core/composition.py``) per
site kind; with Δᵢ a child's parallel delta and gᵢ its input- or output-site transform
(a child with nothing there: Δᵢ = 0, gᵢ = identity):

    block      parallel sites (y + Δ)       input / output sites (t = x or y)
    Stack      Δ = Σ Δᵢ                     t ← gₙ(… g₂(g₁(t)))          (b after a)
    Parallel   Δ = Σ Δᵢ                     t ← t + Σ (gᵢ(t) − t)
    Average    Δ = Σ ŵᵢ Δᵢ                  t ← Σ ŵᵢ gᵢ(t)               ŵ = w / Σ w

At a module, the parallel step acts first (on the module's own output), then the output step.
A list of names, ``set_adapter(["a", "b"])``, is ``Stack("a", "b")``. Average's weights are
normalised to sum to 1, so a module where no child acts is left as it is (Σ ŵᵢ t = t) and the
block is a weighted average of the children's outputs. Blocks are frozen dataclasses that nest
and round-trip through JSON (:meth:`Block.to_dict`, :meth:`Block.from_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from peftlab.core.composition import (
    Composition, ParallelStep, SequentialStep, Step, chain_steps, sum_steps,
)


def parallel_outputs(t: torch.Tensor, outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """t + Σᵢ (gᵢ(t) − t): the children's changes of t added (Parallel at an input/output site)."""
    total = t
    for o in outs:
        total = total + (o - t)
    return total


def weighted_sum(weights: Sequence[float], outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σᵢ wᵢ oᵢ (Average: of the children's Δ at a parallel site, of gᵢ(t) at an input/output site)."""
    total = weights[0] * outs[0]
    for w, o in zip(weights[1:], outs[1:]):
        total = total + w * o
    return total


def _leaves(children: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for c in children:
        out += [c] if isinstance(c, str) else _leaves(c.children)
    return out


@dataclass(frozen=True, init=False, repr=False)
class Block(Composition):
    """A node of the tree: ``children`` are adapter names or blocks (none empty, no name twice)."""

    children: tuple[Composition | str, ...]
    #: The name of the block in :meth:`to_dict`.
    kind: ClassVar[str] = ""

    def __init__(self, *children: "Block | str"):
        object.__setattr__(self, "children", self._checked(children))

    def _checked(self, children: Sequence[Any]) -> tuple:
        name = type(self).__name__
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])  # Stack(["a", "b"]) as Stack("a", "b")
        if not children:
            raise ValueError(f"{name}() needs at least one adapter name or block")
        for c in children:
            if not (isinstance(c, Block) or (isinstance(c, str) and c)):
                raise TypeError(f"{name}: a child must be an adapter name (non-empty str) or a block, got {c!r}")
        leaves = _leaves(children)
        twice = sorted({n for n in leaves if leaves.count(n) > 1})
        if twice:
            raise ValueError(f"{name}: adapter(s) {twice} appear more than once in the composition")
        return tuple(children)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(c) for c in self.children)}{self._extra_repr()})"

    def _extra_repr(self) -> str:
        return ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: ``{"block": kind, "children": [name or dict, ...]}`` (+ Average's weights)."""
        return {"block": self.kind, "children": [c if isinstance(c, str) else c.to_dict() for c in self.children]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Block":
        """Inverse of :meth:`to_dict` (called on a subclass, the dict must be of that kind)."""
        kinds = {k.kind: k for k in (Stack, Parallel, Average)}
        kind = d.get("block") if isinstance(d, dict) else None
        if kind not in kinds:
            raise ValueError(f"not a composition block: {d!r} (expected {{'block': one of {sorted(kinds)}, 'children': [...]}})")
        if cls is not Block and kinds[kind] is not cls:
            raise ValueError(f"{cls.__name__}.from_dict got a {kind!r} block")
        extra = sorted(set(d) - {"block", "children", "weights"})
        if extra:
            raise ValueError(f"{kind} block: unknown keys {extra}")
        children = [c if isinstance(c, str) else Block.from_dict(c) for c in d.get("children", [])]
        return kinds[kind](*children, **({"weights": d["weights"]} if "weights" in d else {}))


@dataclass(frozen=True, init=False, repr=False)
class Stack(Block):
    """Children applied in order (b after a): parallel deltas summed, input/output transforms composed."""

    kind: ClassVar[str] = "stack"
    folds_in_order: ClassVar[bool] = True

    def combine(self, steps: list[Step | None], kind: str) -> Step | None:
        """Σ Δᵢ at a parallel site; gₙ ∘ … ∘ g₁ at an input/output site."""
        return sum_steps(steps) if kind == "parallel" else chain_steps(steps)  # type: ignore[arg-type]


@dataclass(frozen=True, init=False, repr=False)
class Parallel(Block):
    """Children side by side, their outputs summed: Σ Δᵢ, or t + Σ (gᵢ(t) − t)."""

    kind: ClassVar[str] = "parallel"

    def combine(self, steps: list[Step | None], kind: str) -> Step | None:
        """Σ Δᵢ at a parallel site; t + Σ (gᵢ(t) − t) at an input/output site (:func:`parallel_outputs`)."""
        if kind == "parallel":
            return sum_steps(steps)  # type: ignore[arg-type]
        acting: list[SequentialStep] = [s for s in steps if s is not None]  # type: ignore[misc]
        if len(acting) <= 1:
            return acting[0] if acting else None
        return lambda x, t, call: parallel_outputs(t, [s(x, t, call) for s in acting])


@dataclass(frozen=True, init=False, repr=False)
class Average(Block):
    """Weighted average of the children's outputs: Σ ŵᵢ Δᵢ, or Σ ŵᵢ gᵢ(t), ŵ = w / Σ w
    (default weights: equal)."""

    weights: tuple[float, ...]
    kind: ClassVar[str] = "average"

    def __init__(self, *children: "Block | str", weights: Sequence[float] | None = None):
        children = self._checked(children)
        object.__setattr__(self, "children", children)
        w = [1.0] * len(children) if weights is None else list(weights)
        if len(w) != len(children):
            raise ValueError(f"Average: {len(w)} weights for {len(children)} children")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in w):
            raise ValueError(f"Average: weights must be finite numbers, got {w}")
        if abs(sum(w)) < 1e-12:
            raise ValueError(f"Average: the weights {w} sum to 0; they are normalised by their sum")
        object.__setattr__(self, "weights", tuple(float(v) for v in w))

    def _extra_repr(self) -> str:
        return f", weights={list(self.weights)}"

    def normalized(self) -> list[float]:
        """ŵᵢ = wᵢ / Σ w."""
        total = sum(self.weights)
        return [w / total for w in self.weights]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "weights": list(self.weights)}

    def combine(self, steps: list[Step | None], kind: str) -> Step | None:
        """Σ ŵᵢ Δᵢ over the children acting at a parallel site; Σ ŵᵢ gᵢ(t) at an input/output site,
        gᵢ = identity for a child that does not act there (:func:`weighted_sum`)."""
        if all(s is None for s in steps):
            return None
        w = self.normalized()
        if kind == "parallel":
            pairs: list[tuple[float, ParallelStep]] = [(wi, s) for wi, s in zip(w, steps) if s is not None]  # type: ignore[misc]
            return lambda x, y: weighted_sum([p[0] for p in pairs], [s(x, y) for _, s in pairs])
        seq: list[SequentialStep | None] = list(steps)  # type: ignore[arg-type]
        return lambda x, t, call: weighted_sum(w, [t if s is None else s(x, t, call) for s in seq])
