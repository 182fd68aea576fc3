"""Composition as data (DESIGN.md principle 2): which adapters are active, and how, as a small tree.

The blocks (``Stack``, ``Parallel``, ``Average``) live in ``peftlab/compose/blocks.py``; this module
holds only what the dispatcher needs: the base class :class:`Composition` and :func:`compile_plan`,
which turns the active tree (or a plain list of names) into one :class:`Plan` per hooked module.
A dispatcher compiles its plan once per state version, so a call does no more work than applying
the deltas themselves.

At one module, each site kind compiles to one *step*, or None when nothing acts there:

    parallel   f(x, y) -> Δ                 added to the module's output y
    output     g(x, y, call) -> y'          call: the module's keyword arguments
    input      g(x, x, call) -> x'          (the same signature: the second argument is transformed)

A leaf (an adapter name) sums its parallel deltas and applies its input / output deltas in the
order they were placed. A block combines its children's steps (:meth:`Composition.combine`); a
plain list of names combines as ``Stack`` does: parallel deltas summed, input and output deltas
applied in order (what several active adapters have always meant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Sequence, Union

import torch

from peftlab.core.delta import Delta

ParallelStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SequentialStep = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
Step = Union[ParallelStep, SequentialStep]


class Composition:
    """A node of the composition tree: ``children`` are adapter names or other nodes.

    Subclasses define :meth:`combine`; ``kind`` is ``"parallel"`` (steps return a Δ to add) or
    ``"sequential"`` (input and output sites: steps return the transformed tensor)."""

    children: tuple["Composition | str", ...]
    #: True when the block applies its children one after another (Stack): ``merge()`` folds such
    #: a tree into the weights adapter by adapter; other blocks cannot be folded that way.
    folds_in_order: ClassVar[bool] = False

    def combine(self, steps: list[Step | None], kind: str) -> Step | None:
        """One step from the children's steps (None: that child does nothing at this module)."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """Every adapter name in the tree, in order, each once."""
        out: list[str] = []
        for c in self.children:
            for n in [c] if isinstance(c, str) else c.names():
                if n not in out:
                    out.append(n)
        return out

    def walk(self) -> Iterator["Composition"]:
        """This node and every block below it."""
        yield self
        for c in self.children:
            if isinstance(c, Composition):
                yield from c.walk()


@dataclass(frozen=True)
class Plan:
    """The compiled composition at one module: one step per site kind (None: nothing to do)."""

    input: SequentialStep | None = None
    parallel: ParallelStep | None = None
    output: SequentialStep | None = None

    @property
    def empty(self) -> bool:
        return self.input is None and self.parallel is None and self.output is None


def sum_steps(steps: Sequence[ParallelStep | None]) -> ParallelStep | None:
    """f(x, y) = Σ fᵢ(x, y) over the steps that act (a single one is returned as it is)."""
    acting = [s for s in steps if s is not None]
    if len(acting) <= 1:
        return acting[0] if acting else None

    def total(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = acting[0](x, y)
        for s in acting[1:]:
            out = out + s(x, y)
        return out

    return total


def chain_steps(steps: Sequence[SequentialStep | None]) -> SequentialStep | None:
    """g = gₙ ∘ … ∘ g₁ over the steps that act (a single one is returned as it is)."""
    acting = [s for s in steps if s is not None]
    if len(acting) <= 1:
        return acting[0] if acting else None

    def chain(x: torch.Tensor, t: torch.Tensor, call: dict) -> torch.Tensor:
        for s in acting:
            t = s(x, t, call)
        return t

    return chain


def _sequential(d: Delta, site: str) -> SequentialStep:
    if site == "input":
        return lambda x, t, call: d(t)
    if d.reads_call:
        return lambda x, t, call: d(x, t, call=call)
    return lambda x, t, call: d(x, t)


def _leaf(deltas: Sequence[Delta]) -> Plan:
    return Plan(
        input=chain_steps([_sequential(d, "input") for d in deltas if d.site == "input"]),
        parallel=sum_steps([d for d in deltas if d.site == "parallel"]),
        output=chain_steps([_sequential(d, "output") for d in deltas if d.site == "output"]),
    )


def compile_plan(node: Composition | Sequence[str], lookup: Callable[[str], Sequence[Delta]]) -> Plan:
    """The plan of ``node`` (a tree, or a list of names combined as a Stack) at one module;
    ``lookup(name)`` gives that adapter's deltas there (empty when it has none or is merged)."""
    children = node.children if isinstance(node, Composition) else tuple(node)
    plans = [_leaf(lookup(c)) if isinstance(c, str) else compile_plan(c, lookup) for c in children]
    if not isinstance(node, Composition):
        return Plan(chain_steps([p.input for p in plans]), sum_steps([p.parallel for p in plans]),
                    chain_steps([p.output for p in plans]))
    return Plan(
        node.combine([p.input for p in plans], "sequential"),
        node.combine([p.parallel for p in plans], "parallel"),
        node.combine([p.output for p in plans], "sequential"),
    )


def is_foldable(node: Any) -> bool:
    """Whether ``merge()`` can fold the active composition adapter by adapter: a list of names, or
    a tree of blocks that all apply their children in order."""
    return not isinstance(node, Composition) or all(n.folds_in_order for n in node.walk())
