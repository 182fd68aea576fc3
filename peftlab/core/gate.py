"""Gates: a learned, input-dependent weight on what a delta adds (UniPELT, Mao et al. 2022, "UniPELT: A
Unified Framework for Parameter-Efficient Language Model Tuning"; seed 000 III-D1, seed 001 §11.3).

Per row of the batch, from x = the hooked module's input (batch, tokens, d):

    G(x) = mean_t σ(W_g x_t + b_g) ∈ (0, 1)^k,        W_g ∈ R^{k×d}, b_g ∈ R^k

(the sigmoid per position, then the mean over the sequence, padding included, as UniPELT's code and
AdapterHub's compute it). A gated delta applies the fraction G of its change:

    parallel   y ← y + G(x) · Δ(x, y)
    output     y ← y + G(x) · (δ(x, y) − y)
    input      x ← x + G(x) · (δ(x) − x)

``gate=true`` is an option of the configs that mix in :class:`GateOption` (lora / dora / lora_fa,
houlsby / pfeiffer, prefix / ptuning_v2); their builders wrap what they place with :func:`gated`
(a prefix gates its key/value rows itself: ``methods/additive/prefix_gate.py``, k = 2). W_g starts
N(0, 0.02²) and b_g at 0 (AdapterHub's init), so G ≈ 1/2 at init; a delta that is zero at init
(LoRA's B = 0, an adapter's W_up = 0) stays zero whatever G, so identity at init is kept. Closing a
gate (b_g → −∞) gives G = 0 exactly, which removes exactly that delta's change.

A gated delta does not merge (G depends on x); its rank bound is its delta's; its changed parameters
are its own (those of a delta that cannot merge). Files: the delta's own keys, plus ``gate.weight``
(k, d) and ``gate.bias`` (k,). Mixed batches: the wrapped delta's batched path, then every row's own
gate from gathered (W_g, b_g) in one batched product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.delta import Delta, broadcast_rows, per_row
from peftlab.core.layers import layer_info
from peftlab.core.targeting import is_linear

GATE_KEYS = ("gate.weight", "gate.bias")


@dataclass(kw_only=True)
class GateOption:
    """Config mixin (put it first among the bases): ``gate`` (default false) multiplies what the
    method adds by a learned gate G(x) = mean_t σ(W_g x_t + b_g) (UniPELT); see this module."""

    gate: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # AdapterConfig's: normalises, validates
        if not isinstance(self.gate, bool):
            raise ConfigError(f"{type(self).__name__}.gate={self.gate!r} is invalid: expected true or false")


# -- the math -------------------------------------------------------------------------------------
def gate_value(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """G = mean_t σ(W_g x_t + b_g) (UniPELT, Mao et al. 2022): x (batch, ..., d) → (batch, k), the
    mean over every position between the batch and the feature dimension."""
    g = torch.sigmoid(nn.functional.linear(x, weight, bias))
    return g.reshape(g.shape[0], -1, g.shape[-1]).mean(1)


def routed_gate_value(weights: torch.Tensor, biases: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row i's own gate: mean_t σ(W_i x_{i,t} + b_i) for gathered W (batch, k, d), b (batch, k)."""
    xf = x.reshape(x.shape[0], -1, x.shape[-1]).to(weights.dtype)
    return torch.sigmoid(torch.baddbmm(biases.unsqueeze(1), xf, weights.transpose(1, 2))).mean(1)


def apply_gate(site: str, g: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """What a gated delta computes from its delta's result ``out``: parallel G·Δ; output y + G·(δ − y);
    input x + G·(δ − x). ``g`` is (batch, 1), broadcast over the other dimensions."""
    old = None if site == "parallel" else (x if site == "input" else y)
    change = out if old is None else out - old
    scaled = change * broadcast_rows(g, change).to(change.dtype)
    return scaled if old is None else old + scaled


# -- modules ----------------------------------------------------------------------------------------
class Gate(nn.Module):
    """G(x) = mean_t σ(W_g x_t + b_g), W_g (k, d) ~ N(0, 0.02²), b_g = 0."""

    def __init__(self, d: int, k: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, d) * 0.02)
        self.bias = nn.Parameter(torch.zeros(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, k) gate values for x (batch, ..., d), computed in the gate's dtype."""
        return gate_value(x.to(self.weight.dtype), self.weight, self.bias)


class GatedDelta(Delta):
    """A delta whose change is weighted by a gate on the hooked module's input (module docstring).
    Same site as the delta it wraps; never mergeable."""

    def __init__(self, inner: Delta, d_in: int):
        super().__init__()
        self.inner = inner
        self.gate = Gate(d_in, 1)
        self.site = inner.site  # type: ignore[misc]  # per instance: the wrapped delta's
        self.reads_call = inner.reads_call  # type: ignore[misc]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, call: dict | None = None) -> torch.Tensor:
        """The wrapped delta's result, gated by G(x) as its site requires."""
        if self.site == "input":
            out = self.inner(x)
        else:
            out = self.inner(x, y, call=call) if self.reads_call else self.inner(x, y)
        return apply_gate(self.site, self.gate(x), x, y, out)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, *call: Any
    ) -> torch.Tensor | None:
        """Mixed batch: the wrapped deltas' own batched path, then each row's gate, gathered (a base
        row's change is zero, so its gate does not matter). None (sub-batches) when the wrapped
        deltas have no batched path or differ in type."""
        present = [d for d in deltas if d is not None]
        if not present or not all(isinstance(d, GatedDelta) for d in present):
            return None
        inner_cls = type(present[0].inner)  # type: ignore[union-attr]
        if any(type(d.inner) is not inner_cls for d in present):  # type: ignore[union-attr]
            return None
        inners = [d.inner if d is not None else None for d in deltas]  # type: ignore[union-attr]
        out = inner_cls.forward_routed(inners, slot, x, y, *call)  # type: ignore[call-arg]
        if out is None:
            return None
        ref = present[0].gate.weight  # type: ignore[union-attr]
        weights = per_row([d.gate.weight if d is not None else None for d in deltas], slot, torch.zeros_like(ref))  # type: ignore[union-attr]
        biases = per_row([d.gate.bias if d is not None else None for d in deltas], slot,  # type: ignore[union-attr]
                         torch.zeros_like(present[0].gate.bias))  # type: ignore[union-attr]
        return apply_gate(present[0].site, routed_gate_value(weights, biases, x), x, y, out)

    def rank(self) -> int | None:
        return self.inner.rank()

    def file_state(self) -> dict[str, torch.Tensor]:
        """The wrapped delta's tensors under its own keys, plus ``gate.weight`` and ``gate.bias``."""
        return {**self.inner.file_state(), "gate.weight": self.gate.weight, "gate.bias": self.gate.bias}

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_file_state({k: v for k, v in state.items() if k not in GATE_KEYS})
        self.gate.load_state_dict({k.split(".", 1)[1]: state[k] for k in GATE_KEYS}, strict=True)


def gated(model: nn.Module, placement: dict[str, Delta], enabled: bool) -> dict[str, Delta]:
    """``placement`` ({module name: delta}) with each delta in a :class:`GatedDelta` whose gate reads
    the module's input, if ``enabled`` (else unchanged). Gates need a Linear or Conv1D module (a
    feature vector per position): any other module raises :class:`ConfigError`."""
    if not enabled:
        return placement
    out: dict[str, Delta] = {}
    for name, delta in placement.items():
        module = model.get_submodule(name)
        if not is_linear(module):
            raise ConfigError(f"gate=true gates deltas on Linear or Conv1D layers; {name!r} is a "
                              f"{type(module).__name__} (choose linear targets, or gate=false)")
        out[name] = GatedDelta(delta, layer_info(module).in_features)
    return out
