"""(W1 ⊗ W2) x without forming the Kronecker product, and without keeping an intermediate for backward.

With x (row-major, ``(..., c·d)``) viewed per token as X ∈ R^{c×d},

    (W1 ⊗ W2) x = vec(W1 X W2ᵀ),   W1 ∈ R^{a×c}, W2 ∈ R^{b×d}

Plain autograd through the two matmuls keeps the per-token intermediate Z = W1 X (a·d values per
token, as wide as a layer's output) for W2's gradient. :class:`_KronApply` keeps only x and the two
small factors and recomputes what backward needs, with G the per-token output gradient (a × b):

    ∂/∂X = W1ᵀ (G W2)     ∂/∂W1 = Σ_tokens (G W2) Xᵀ     ∂/∂W2 = Σ_tokens Gᵀ (W1 X)
"""

from __future__ import annotations

import torch


def _kron_apply_plain(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    a, c = w1.shape
    b, d = w2.shape
    xm = x.reshape(*x.shape[:-1], c, d)
    return torch.matmul(torch.matmul(w1, xm), w2.T).reshape(*x.shape[:-1], a * b)


class _KronApply(torch.autograd.Function):
    """vec(W1 X W2ᵀ) keeping x, W1 and W2 for backward (not W1 X); see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w1, w2)
        return _kron_apply_plain(x, w1, w2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, w1, w2 = ctx.saved_tensors
        (a, c), (b, d) = w1.shape, w2.shape
        g = grad.reshape(-1, a, b)
        xm = x.reshape(-1, c, d)
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g_z = torch.matmul(g, w2)  # (tokens, a, d): the gradient of Z = W1 X
            if ctx.needs_input_grad[0]:
                grad_x = torch.matmul(w1.T, g_z).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                grad_w1 = torch.einsum("nad,ncd->ac", g_z, xm)
        if ctx.needs_input_grad[2]:
            grad_w2 = torch.einsum("nab,nad->bd", g, torch.matmul(w1, xm))
        return grad_x, grad_w1, grad_w2


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(W1 ⊗ W2) x for x (..., c·d) without forming the Kronecker product: vec(W1 X W2ᵀ), X = x as
    (c, d); with autograd through :class:`_KronApply` (W1 X is recomputed in backward, not kept)."""
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad):
        return _KronApply.apply(x, w1, w2)
    return _kron_apply_plain(x, w1, w2)
