"""LoKr's (W1 ⊗ W2) x (``methods/reparam/kron_apply.py``): the autograd Function's outputs and
gradients equal plain autograd through the two matmuls, float64 gradcheck, the explicit Kronecker
product, and nothing as wide as a token's output kept for backward but x."""

from __future__ import annotations

import torch

from peftlab.methods.reparam.kron_apply import _kron_apply_plain, kron_apply


def operands(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4 * 5, dtype=dtype, generator=g)
    return x, torch.randn(6, 4, dtype=dtype, generator=g), torch.randn(7, 5, dtype=dtype, generator=g)


def test_equals_plain_autograd_and_explicit_kron():
    ops = operands()
    g = torch.randn(2, 3, 6 * 7, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (kron_apply, _kron_apply_plain):
        leaves = [t.clone().requires_grad_(True) for t in ops]
        out = fn(*leaves)
        results.append((out.detach(), *torch.autograd.grad(out, leaves, g)))
    for ours, plain in zip(*results):
        torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    x, w1, w2 = ops
    torch.testing.assert_close(results[0][0], x @ torch.kron(w1, w2).T, atol=1e-4, rtol=1e-5)


def test_gradcheck_float64_and_partial_needs():
    x, w1, w2 = (t.requires_grad_(True) for t in operands(torch.float64))
    assert torch.autograd.gradcheck(kron_apply, (x, w1, w2))
    frozen_x = x.detach()
    assert torch.autograd.gradcheck(kron_apply, (frozen_x, w1, w2))  # LoKr's usual case: x needs no grad
    assert torch.autograd.gradcheck(lambda a: kron_apply(a, w1.detach(), w2.detach()), (x,))


def test_keeps_x_and_the_factors_only():
    x, w1, w2 = operands()
    x.requires_grad_(True)
    w1.requires_grad_(True)
    w2.requires_grad_(True)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        kron_apply(x, w1, w2)
    assert {t.data_ptr() for t in kept} == {x.data_ptr(), w1.data_ptr(), w2.data_ptr()}
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        _kron_apply_plain(x, w1, w2)
    assert max(t.numel() for t in kept) >= 2 * 3 * 6 * 5  # plain autograd keeps W1 X: what this avoids
