"""Common math of the bottleneck adapters (houlsby, pfeiffer, par_adapter, compacter, compacter_pp).

Every one of them computes a bottleneck branch

    branch(x) = W_up σ(W_down x + b_down) + b_up,     W_down ∈ R^{m×d_in}, W_up ∈ R^{d_out×m}

(Houlsby et al. 2019; seed 001 §6.1, seed 002 §3.1.1) and differs only in where the branch sits
(after a sublayer, sequentially: y ← y + branch(y); beside it, in parallel: y ← y + s·branch(x)) and
in how its weights are made (plain matrices, or Compacter's sums of Kronecker products). This module
holds what they share: the config fields (bottleneck size, activation, AdapterDrop), the branch as a
pure function, the gathered mixed-batch computation, and the delta base classes. A delta supplies
its weights through :meth:`BottleneckDelta.weights`; everything else is here.

AdapterDrop (Rücklé et al. 2021; seed 000 III-A1, seed 002 §4.2): ``adapterdrop=k`` places no
adapter in the lowest k layers (the layer of a module is the first integer in its name, so an
encoder-decoder drops the lowest k blocks of each stack). :func:`select_adapter_modules` is the one
place that applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig
from peftlab.core.delta import Delta, per_row
from peftlab.core.targeting import TargetError, layer_index, select_modules

#: Activations σ of the bottleneck; each has σ(0) = 0, so a zero (padding or base) row adds nothing.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(kw_only=True)
class BottleneckConfig(AdapterConfig):
    """Fields every bottleneck adapter has: bottleneck m = d // reduction_factor (at least 1);
    activation relu | gelu | silu; ``adapterdrop`` = k: no adapter in the lowest k layers."""

    reduction_factor: float = 16
    activation: str = "relu"
    adapterdrop: int = 0

    def validate(self) -> None:
        rf = self.reduction_factor
        self._check(isinstance(rf, (int, float)) and not isinstance(rf, bool) and rf > 0, "reduction_factor",
                    "a positive number")
        self._check(self.activation in ACTIVATIONS, "activation", f"one of {', '.join(ACTIVATIONS)}")
        k = self.adapterdrop
        self._check(isinstance(k, int) and not isinstance(k, bool) and k >= 0, "adapterdrop",
                    "an int >= 0 (the number of lowest layers without an adapter)")

    def bottleneck(self, d: int) -> int:
        """The bottleneck size m for a d-dimensional input: d // reduction_factor, at least 1."""
        return max(1, int(d // self.reduction_factor))


@dataclass(kw_only=True)
class SizedBottleneckConfig(BottleneckConfig):
    """A bottleneck config whose size may also be given directly: ``r`` (if set) wins over
    ``reduction_factor``."""

    r: int | None = None

    def validate(self) -> None:
        super().validate()
        self._check(self.r is None or _positive_int(self.r), "r", "a positive int or none")

    def bottleneck(self, d: int) -> int:
        """``r`` if given, else d // reduction_factor (at least 1)."""
        return self.r if self.r is not None else super().bottleneck(d)


def select_adapter_modules(model: nn.Module, cfg: BottleneckConfig, **select: object) -> dict[str, nn.Module]:
    """:func:`~peftlab.core.targeting.select_modules` (``select`` passes its arguments), then
    AdapterDrop: modules in the lowest ``cfg.adapterdrop`` layers are removed (a module outside any
    numbered layer is kept). Raises :class:`TargetError` when AdapterDrop removes every module."""
    chosen = select_modules(model, cfg, **select)  # type: ignore[arg-type]
    k = cfg.adapterdrop
    if not k:
        return chosen
    kept = {n: m for n, m in chosen.items() if (layer_index(n) is None or layer_index(n) >= k)}
    if not kept:
        deepest = max(layer_index(n) or 0 for n in chosen)
        raise TargetError(f"{cfg.method}: adapterdrop={k} removes every adapter (the selected modules lie in "
                          f"layers 0..{deepest}); use adapterdrop <= {deepest}")
    return kept


def bottleneck_branch(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                      b_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """W_up σ(W_down x + b_down) + b_up for x of shape (..., d_in) (Houlsby et al. 2019)."""
    return F.linear(act(F.linear(x, w_down, b_down)), w_up, b_up)


def bottleneck_adapter(y: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                       b_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The sequential adapter y + W_up σ(W_down y + b_down) + b_up for y of shape (..., d)."""
    return y + bottleneck_branch(y, w_down, b_down, w_up, b_up, act)


class BottleneckDelta(Delta):
    """A delta computing ``branch(x) = W_up σ(W_down x + b_down) + b_up``; subclasses supply the
    weights (:meth:`weights`), the bottleneck size ``r`` and the ``activation`` name."""

    r: int
    activation: str

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_down (m, d_in), b_down (m,), W_up (d_out, m), b_up (d_out,))."""
        raise NotImplementedError

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """branch(x), computed in the adapter's dtype (cast x first)."""
        w_down, b_down, w_up, b_up = self.weights()
        return bottleneck_branch(x.to(w_down.dtype), w_down, b_down, w_up, b_up, ACTIVATIONS[self.activation])

    def extra_repr(self) -> str:
        return f"r={self.r}, activation={self.activation}"


def routed_branch(deltas: Sequence[BottleneckDelta | None], slot: torch.Tensor, x: torch.Tensor,
                  scales: Sequence[float] | None = None) -> torch.Tensor:
    """Mixed batch: row i gets ``scale_k · branch_k(x_i)`` for k = slot[i] (zero where slot is −1 or
    the slot has no delta), as two gathered batched matmuls.

    Bottlenecks are zero-padded to the widest; a zero row adds σ(0)·0 = 0. Adapters with different
    activations are still one computation: the pre-activation is shared and each row takes its own
    activation."""
    present = [d for d in deltas if d is not None]
    weights = [d.weights() if d is not None else None for d in deltas]
    ref = next(w for w in weights if w is not None)[0]
    r = max(w[0].shape[0] for w in weights if w is not None)
    d_out, d_in = next(w for w in weights if w is not None)[2].shape[0], ref.shape[1]

    def padded(w: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:  # bottleneck zero-padded to r
        extra = r - w[0].shape[0]
        return F.pad(w[0], (0, 0, 0, extra)), F.pad(w[1], (0, extra)), F.pad(w[2], (0, extra)), w[3]

    new = ref.new_zeros
    zeros = (new(r, d_in), new(r), new(d_out, r), new(d_out))
    parts = [padded(w) if w is not None else None for w in weights]
    down_w, down_b, up_w, up_b = (per_row([q[i] if q else None for q in parts], slot, z) for i, z in enumerate(zeros))
    xf = x.reshape(x.shape[0], -1, d_in).to(ref.dtype)  # (batch, tokens, d_in)
    pre = torch.baddbmm(down_b.unsqueeze(1), xf, down_w.transpose(1, 2))  # (batch, tokens, r)
    kinds = sorted({d.activation for d in present})
    h = ACTIVATIONS[kinds[0]](pre)
    if len(kinds) > 1:  # each row its own σ (base rows: σ(0) = 0 whichever is used)
        names = [kinds[0]] + [d.activation if d is not None else kinds[0] for d in deltas]
        for kind in kinds[1:]:
            rows = torch.tensor([n == kind for n in names], device=slot.device)[slot + 1]
            h = torch.where(rows.view(-1, 1, 1), ACTIVATIONS[kind](pre), h)
    out = torch.baddbmm(up_b.unsqueeze(1), h, up_w.transpose(1, 2))  # (batch, tokens, d_out)
    if scales is not None:
        s = torch.tensor([0.0, *scales], dtype=out.dtype, device=out.device)[slot + 1]
        out = out * s.view(-1, 1, 1)
    return out.reshape(*x.shape[:-1], d_out)


class LinearBottleneck(BottleneckDelta):
    """Bottleneck with plain weight matrices ``adapter_down`` (d_in → m) and ``adapter_up`` (m → d_out):
    W_down Kaiming-uniform, b_down = 0, W_up = 0, b_up = 0, so the branch is 0 at init."""

    def __init__(self, d_in: int, m: int, d_out: int, activation: str):
        super().__init__()
        self.r = m
        self.activation = activation
        self.adapter_down = nn.Linear(d_in, m)
        self.adapter_up = nn.Linear(m, d_out)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight, self.adapter_up.bias


class SequentialBottleneck(BottleneckDelta):
    """Output site: y ← y + branch(y) (the sequential adapter)."""

    site = "output"

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y + W_up σ(W_down y + b_down) + b_up, in y's dtype."""
        assert y is not None
        w_down, b_down, w_up, b_up = self.weights()
        out = bottleneck_adapter(y.to(w_down.dtype), w_down, b_down, w_up, b_up, ACTIVATIONS[self.activation])
        return out.to(y.dtype)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Mixed batch: y + routed_branch(y), each row with its own adapter's weights."""
        if y is None or not all(isinstance(d, SequentialBottleneck) for d in deltas if d is not None):
            return None
        dtype = next(d for d in deltas if d is not None).weights()[0].dtype  # type: ignore[union-attr]
        yf = y.to(dtype)
        return (yf + routed_branch(deltas, slot, yf)).to(y.dtype)  # type: ignore[arg-type]
