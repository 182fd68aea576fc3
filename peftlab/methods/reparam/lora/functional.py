"""The LoRA math as pure functions: Δh = s · B A dropout(x), its dropout mask, DoRA's output, and
the PiSSA / OLoRA factors of W0.

Dropout is applied to A's input without keeping a dropped copy of x for backward
(:class:`_DropoutThenLinear`): the mask is regenerated from a seed, and the 1/(1 − p) rescale is
applied to the r-dim output. With a frozen A (LoRA-FA, Zhang et al. 2023) x is not kept at all.
DoRA's Δh = (g − 1) ⊙ W0 x + g ⊙ s B A x keeps W0 x and the rank-r s A x for backward, not the
full-width s B A x (:class:`_DoraDelta`): g's gradient recomputes that product, a rank-r matmul.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


class _DropoutThenLinear(torch.autograd.Function):
    """``F.linear(dropout(x), A)`` that keeps no dropped copy of x for backward.

    The mask is regenerated from a seed in backward (once, for both gradients), and x is saved only
    when A needs a gradient, so dropout costs no activation memory and LoRA-FA (frozen A) keeps
    nothing but A x. The 1/(1 − p) rescale is applied to the r-dim output, not to x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:  # type: ignore[override]
        ctx.p, ctx.seed = p, seed
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        if p == 0:
            return F.linear(x, weight)
        keep, scale = keep_mask(x.shape, x.device, p, seed)
        return F.linear(x * keep, weight) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        keep, scale = None, 1.0
        if ctx.p > 0:
            keep, scale = keep_mask((*grad.shape[:-1], weight.shape[1]), grad.device, ctx.p, ctx.seed)
            grad = grad * scale
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight if keep is None else (grad @ weight) * keep
        if ctx.needs_input_grad[1]:
            xd = x if keep is None else x * keep
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])
        return grad_x, grad_w, None, None


def keep_mask(shape: Sequence[int], device: torch.device, p: float, seed: int) -> tuple[torch.Tensor, float]:
    """A dropout keep-mask of ``shape`` that depends only on (seed, shape, device), and the rescale
    1/P(keep).

    The mask compares 15-bit uniform integers with round(p · 2¹⁵), so P(drop) is p to within 2⁻¹⁶ and
    the rescale uses the exact P(keep): E[mask · scale] = 1. Four 15-bit draws come from one random
    int64 on CPU, about six times faster than ``bernoulli_`` (the mask is made twice per step).
    """
    threshold = min(round(p * 32768), 32767)
    gen = torch.Generator(device=device).manual_seed(seed)
    if torch.device(device).type == "cpu":
        n = math.prod(shape)
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(generator=gen)
        bits = words.view(torch.int16)[:n].view(tuple(shape)).bitwise_and_(0x7FFF)  # an int64's top bit is 0
    else:  # accelerators draw fast enough one int16 in [0, 2¹⁵) at a time
        bits = torch.empty(tuple(shape), dtype=torch.int16, device=device).random_(generator=gen)
    return bits >= threshold, 32768 / (32768 - threshold)


def lora_down(x: torch.Tensor, A: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """A · dropout(x), the memory-lean way when it matters (dropout, or a frozen A)."""
    use_fn = torch.is_grad_enabled() and (x.requires_grad or A.requires_grad) and ((training and p > 0) or not A.requires_grad)
    if use_fn:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return _DropoutThenLinear.apply(x, A, p if training else 0.0, seed)
    if training and p > 0:
        x = F.dropout(x, p, True)
    return F.linear(x, A)


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Δh = s · B A dropout(x) for x of shape (..., in); the scale is applied to the r-dim middle."""
    return F.linear(lora_down(x, A, p, training) * scaling, B)


class _DoraDelta(torch.autograd.Function):
    """``(g − 1) ⊙ base + g ⊙ F.linear(u, B)`` that keeps ``base``, ``u`` (rank r), B and g for
    backward, not the (…, out) product ``F.linear(u, B)``: plain autograd keeps both ``base`` and
    that product (for g's gradient), this keeps one tensor of the layer's output width instead of
    two. The forward's operations and the gradients' are those autograd runs."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, u: torch.Tensor, B: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(base, u, B, g)
        return (g - 1) * base + g * F.linear(u, B)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        base, u, B, g = ctx.saved_tensors
        need_base, need_u, need_B, need_g = ctx.needs_input_grad
        grad_base = grad * (g - 1) if need_base else None
        grad_u = grad_B = grad_g = None
        if need_u or need_B:
            grad_lora = grad * g
            if need_u:
                grad_u = grad_lora @ B
            if need_B:
                grad_B = grad_lora.reshape(-1, grad_lora.shape[-1]).T @ u.reshape(-1, u.shape[-1])
        if need_g:
            grad_g = (grad * base).sum_to_size(g.shape) + (grad * F.linear(u, B)).sum_to_size(g.shape)
        return grad_base, grad_u, grad_B, grad_g


def dora_delta(base: torch.Tensor, u: torch.Tensor, B: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """DoRA's Δh = (g − 1) ⊙ base + g ⊙ B u for ``base`` = W0 x (no bias), ``u`` = s · A x (rank r)
    and g = m / ‖W0 + s B A‖_row, the output width last; with autograd, through
    :class:`_DoraDelta` (one full-width tensor kept for backward instead of two)."""
    if torch.is_grad_enabled() and (base.requires_grad or u.requires_grad or B.requires_grad or g.requires_grad):
        return _DoraDelta.apply(base, u, B, g)
    return (g - 1) * base + g * F.linear(u, B)


def principal_factors(w: torch.Tensor, init: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: A = √S_r U_rᵀ, B = V_r √S_r of the SVD of W0 / s; OLoRA: A = R[:r], B = Q[:, :r] of W0 = QR."""
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Sr = S[:r] / scaling
        return torch.diag(Sr.sqrt()) @ Uh[:r], V[:, :r] @ torch.diag(Sr.sqrt())
    Q, R = torch.linalg.qr(w)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def without_bias(base: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The base layer's output without its bias: W0 x from y = W0 x + b."""
    return y - base.bias if getattr(base, "bias", None) is not None else y
