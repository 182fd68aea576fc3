"""LNFit's change of a norm's output, computed as the norm itself computes it (``lnfit.py``).

A LayerNorm or RMSNorm output is affine in its parameters, y = γ ⊙ n(x) + β, so the change made
by Δγ, Δβ is the same norm with (Δγ, Δβ) as its parameters:

    LayerNorm:  Δy = LN(x; Δγ, Δβ) = Δγ ⊙ (x − μ) / √(σ² + ε) + Δβ
    RMSNorm:    Δy = RMS(x; Δγ)    = Δγ ⊙ x / √(mean(x²) + ε)

and the whole output y + Δy is the norm once with (γ + Δγ, β + Δβ), which is how LNFit computes
it when it is the only delta at its norm (``NormDelta.plus``: one norm in backward, as PEFT's
trained copy of the layer, instead of the base norm's and Δy's).

Computed this way, autograd keeps for backward only what the norm itself keeps: x (the very tensor
the base norm already keeps) and one statistic per row, not the full-width n(x) that the product
Δγ ⊙ n(x) would keep for Δγ's gradient (n is recomputed in backward, one elementwise pass). The
layer norm is ``F.layer_norm`` (its fused backward gives every gradient at once); the RMS norm is
:class:`_RmsNormDelta`, whose forward runs the operations of Llama's / T5's RMSNorm (the same
values as those layers' n(x)).

Which formula a norm layer computes is not guessed from its class: :func:`norm_kind` checks the
layer's own output with γ = 1, β = 0 against each formula on probe inputs, at two scales so that a
wrong ε shows.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

NormKind = Literal["layer_norm", "rms_norm"]
#: Attribute names under which norm layers keep their ε.
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")


def rms_statistic(x: torch.Tensor, eps: float) -> torch.Tensor:
    """r = 1 / √(mean(x²) + ε) over the last dimension (kept, shape (..., 1))."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _RmsNormDelta(torch.autograd.Function):
    """Δγ ⊙ x r, r = 1/√(mean(x²) + ε), keeping x and r (one value per row) for backward, not the
    full-width n = x r: backward recomputes n.

    Gradients, with ĝ = g ⊙ Δγ and H the width:  ∂/∂Δγ = Σ_rows g ⊙ n;
    ∂/∂x = r (ĝ − n · mean(ĝ ⊙ n))."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, d_weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        r = rms_statistic(x, eps)
        ctx.save_for_backward(x, r, d_weight)
        return d_weight * (x * r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, r, d_weight = ctx.saved_tensors
        n = x * r
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_hat = grad * d_weight
            grad_x = r * (g_hat - n * (g_hat * n).mean(-1, keepdim=True))
        if ctx.needs_input_grad[1]:
            grad_w = (grad * n).reshape(-1, n.shape[-1]).sum(0)
        return grad_x, grad_w, None


def rms_norm_delta(x: torch.Tensor, d_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Δy = Δγ ⊙ x / √(mean(x²) + ε) over the last dimension; with autograd through
    :class:`_RmsNormDelta` (x and one value per row kept, not n(x))."""
    if torch.is_grad_enabled() and (x.requires_grad or d_weight.requires_grad):
        return _RmsNormDelta.apply(x, d_weight, eps)
    return d_weight * (x * rms_statistic(x, eps))


def layer_norm_delta(x: torch.Tensor, d_weight: torch.Tensor, d_bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Δy = Δγ ⊙ (x − μ)/√(σ² + ε) + Δβ over the last dimension: ``F.layer_norm`` with (Δγ, Δβ)."""
    return F.layer_norm(x, (x.shape[-1],), d_weight, d_bias, eps)


def norm_with(kind: NormKind, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              eps: float) -> torch.Tensor:
    """A norm of ``kind`` with parameters (``weight``, ``bias``) (an RMS norm has no β): Δy for
    (Δγ, Δβ), or the whole output y + Δy for (γ + Δγ, β + Δβ)."""
    if kind == "layer_norm":
        return layer_norm_delta(x, weight, bias, eps)
    return rms_norm_delta(x, weight, eps)


def normalized_by(kind: NormKind, x: torch.Tensor, eps: float) -> torch.Tensor:
    """n(x) of a norm of ``kind`` (γ = 1, β = 0)."""
    if kind == "layer_norm":
        return F.layer_norm(x, (x.shape[-1],), None, None, eps)
    return x * rms_statistic(x, eps)


def norm_kind(module: nn.Module, n_of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[NormKind, float] | None:
    """``(kind, ε)`` when the layer's n(x) (``n_of``: its output with γ = 1, β = 0) is one of the
    known formulas with the ε the layer holds (``eps``, ``variance_epsilon`` or ``epsilon``), checked
    on float32 probes of unit and of small scale (where ε matters); None otherwise."""
    eps = next((getattr(module, a) for a in _EPS_NAMES if isinstance(getattr(module, a, None), float)), None)
    weight = getattr(module, "weight", None)
    if eps is None or weight is None or weight.device.type == "meta" or weight.dtype != torch.float32:
        return None
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(3, weight.shape[0], generator=gen).to(weight.device) + 0.5
    probes = (probe, probe * max(eps, 1e-12) ** 0.5)
    with torch.no_grad():
        own = [n_of(p) for p in probes]
        for kind in ("layer_norm", "rms_norm"):
            if all(torch.allclose(normalized_by(kind, p, eps), o, rtol=1e-4, atol=1e-5) for p, o in zip(probes, own)):
                return kind, float(eps)
    return None
