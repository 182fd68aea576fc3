"""DoRA's output Δh = (g − 1) ⊙ W0 x + g ⊙ s B A x through ``functional.dora_delta``: the same values
and gradients as plain autograd on the formula, with one full-width tensor kept for backward instead
of two (the rank-r product B u is recomputed where g's gradient needs it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab.methods.reparam.lora.functional import dora_delta

OUT, R = 24, 3


def inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, OUT, generator=gen).requires_grad_(True)
    u = torch.randn(*shape, R, generator=gen).requires_grad_(True)
    B = torch.randn(OUT, R, generator=gen).requires_grad_(True)
    g = (torch.rand(OUT, generator=gen) + 0.5).requires_grad_(True)
    return base, u, B, g


def formula(base, u, B, g):
    return (g - 1) * base + g * F.linear(u, B)


@pytest.mark.parametrize("shape", [(5,), (2, 7), (2, 3, 4)])
def test_values_and_gradients_equal_plain_autograd(shape):
    tensors = inputs(shape)
    grad = torch.randn(*shape, OUT, generator=torch.Generator().manual_seed(1))
    ref, out = formula(*tensors), dora_delta(*tensors)
    assert torch.equal(out, ref)
    for ours, theirs in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(ref, tensors, grad)):
        assert torch.equal(ours, theirs)


def test_only_the_gradients_asked_for_are_computed():
    base, u, B, g = inputs((4,))
    base.requires_grad_(False)
    u.requires_grad_(False)
    (gB, gg) = torch.autograd.grad(dora_delta(base, u, B, g).sum(), (B, g))
    (rB, rg) = torch.autograd.grad(formula(base, u, B, g).sum(), (B, g))
    assert torch.equal(gB, rB) and torch.equal(gg, rg)


def full_width_saved(fn, tensors) -> int:
    """How many distinct non-leaf tensors of the output's width ``fn`` keeps for backward."""
    leaves = {t.data_ptr() for t in tensors}
    seen = set()

    def pack(t):
        if t.shape[-1:] == (OUT,) and t.dim() > 1 and t.data_ptr() not in leaves:
            seen.add(t.data_ptr())
        return t

    base, u, B, g = tensors
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(base * 1.0, u, B, g)  # base as a non-leaf, as W0 x is in a model
    return len(seen)


def test_keeps_one_full_width_tensor_instead_of_two():
    tensors = inputs((2, 6))
    assert full_width_saved(formula, tensors) == 2  # W0 x and B u
    assert full_width_saved(dora_delta, tensors) == 1  # W0 x only


def test_dora_layer_trains_as_the_formula():
    """A DoRA layer's gradients (A, B, magnitude) are the formula's, m/‖W0 + s B A‖ detached."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, OUT)
    model = torch.nn.Sequential(layer)
    pm = peftlab.apply(model, "dora[r=4,alpha=8,targets=0]")
    d = next(delta for _, _, delta in pm.placements["default"])
    with torch.no_grad():
        d.lora_B.weight.normal_(std=0.3)
    x = torch.randn(3, 5, 12)
    pm.train()
    pm(x).square().sum().backward()
    A, B, m = (t.detach().clone().requires_grad_(True) for t in (d.lora_A.weight, d.lora_B.weight, d.lora_magnitude_vector))
    V = layer.weight + 2.0 * B @ A
    W = (m / V.norm(dim=1).detach()).unsqueeze(1) * V
    (x @ W.T + layer.bias).square().sum().backward()
    for ours, ref in ((d.lora_A.weight, A), (d.lora_B.weight, B), (d.lora_magnitude_vector, m)):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-4, rtol=1e-4)
