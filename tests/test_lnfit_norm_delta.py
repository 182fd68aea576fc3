"""LNFit's Δy computed as the norm itself (``methods/selective/norm_delta.py``): the formula found
for each kind of norm layer, outputs and gradients equal to the generic path (n(x) from the layer's
own forward, times Δγ), float64 gradcheck of the RMS autograd Function, and no full-width tensor
kept for backward besides x."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftlab
from conftest import randomize_adapter, tiny_net
from peftlab.methods.selective.lnfit import NormDelta, lnfit_delta, normalized
from peftlab.methods.selective.norm_delta import norm_kind, rms_norm_delta

pytestmark = pytest.mark.filterwarnings("ignore")

LAYERS = {  # model kind -> (norm module name, expected formula)
    "bert": ("encoder.layer.1.output.LayerNorm", "layer_norm"),
    "llama": ("model.layers.0.input_layernorm", "rms_norm"),
    "t5": ("encoder.block.0.layer.0.layer_norm", "rms_norm"),
}


def placed(kind: str) -> tuple[nn.Module, NormDelta]:
    model = tiny_net(kind)
    pm = peftlab.apply(model, "lnfit")
    randomize_adapter(pm, std=0.3)
    name = LAYERS[kind][0]
    return model.get_submodule(name), next(d for _, n, d in pm.placements["default"] if n == name)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_formula_found_and_delta_and_gradients_equal_the_generic_path(kind):
    norm, delta = placed(kind)
    assert delta.formula is not None and delta.formula[0] == LAYERS[kind][1]
    assert delta.formula[1] == pytest.approx(getattr(norm, "eps", getattr(norm, "variance_epsilon", None)))
    torch.manual_seed(0)
    x0 = torch.randn(2, 5, norm.weight.shape[0]) * 2 + 0.3
    grads = []
    for fast in (True, False):
        x = x0.clone().requires_grad_(True)
        d_w = delta.delta_of("weight")
        d_b = delta.delta_of("bias") if "bias" in delta.tuned else None
        out = delta(x) if fast else lnfit_delta(normalized(norm, x, False), d_w, d_b)
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        params = [x, *(getattr(delta, f"tuned_{n}") for n in delta.tuned)]
        grads.append((out.detach(), *torch.autograd.grad(out, params, g)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0][0].abs().max() > 1e-2  # randomized: a real change, not zeros


def test_rms_norm_delta_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_delta(a, b, 1e-5), (x, w))
    plain = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(rms_norm_delta(x, w, 1e-5), plain)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_no_full_width_tensor_kept_but_x(kind):
    norm, delta = placed(kind)
    x = torch.randn(4, 7, norm.weight.shape[0], requires_grad=True)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        delta(x)
    full = [t for t in kept if t.numel() >= x.numel()]
    assert full and all(t.data_ptr() == x.data_ptr() for t in full)


def test_unknown_formula_or_wrong_eps_is_not_taken():
    class ScaledNorm(nn.Module):  # x / max|x|: no known formula, so the generic path is used
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-5

        def forward(self, x):
            return self.weight * x / x.abs().amax(-1, keepdim=True)

    assert norm_kind(ScaledNorm(8), lambda p: p / p.abs().amax(-1, keepdim=True)) is None
    ln = nn.LayerNorm(8, eps=1e-5)
    assert norm_kind(ln, lambda p: nn.functional.layer_norm(p, (8,), eps=1e-5)) == ("layer_norm", 1e-5)
    assert norm_kind(ln, lambda p: nn.functional.layer_norm(p, (8,), eps=1e-3)) is None  # ε must match
    model = nn.Sequential(ScaledNorm(8))
    pm = peftlab.apply(model, "lnfit")
    d = next(d for _, _, d in pm.placements["default"])
    randomize_adapter(pm, std=0.3)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = (d.weight0 + d.delta_of("weight")) * x / x.abs().amax(-1, keepdim=True)
        assert d.formula is None
        torch.testing.assert_close(pm(x), expected, atol=1e-6, rtol=1e-5)


def test_lone_delta_runs_the_norm_once_with_tuned_parameters_and_two_adapters_sum():
    """Alone at its norm, the dispatcher takes ``NormDelta.plus``: y' = LN(x; γ + Δγ, β + Δβ), whose
    graph holds one norm (no base output plus Δy); with two LNFit adapters active both Δs are added."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    pm = peftlab.apply(model, "lnfit", adapter_name="a")
    pm.add_adapter("b", "lnfit")
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    ln, x = model[1], torch.randn(3, 8)
    delta = {n: next(d for _, _, d in pm.placements[n]) for n in ("a", "b")}
    h = model[0](x).detach()

    def expected(*names):
        w = ln.weight + sum(delta[n].delta_of("weight") for n in names)
        b = ln.bias + sum(delta[n].delta_of("bias") for n in names)
        return nn.functional.layer_norm(h, (8,), w, b, ln.eps)

    pm.set_adapter("a")
    out = pm(x)
    assert type(out.grad_fn).__name__ == "NativeLayerNormBackward0"  # one norm, not y + Δy
    torch.testing.assert_close(out, expected("a"), atol=1e-6, rtol=1e-5)
    out.sum().backward()
    assert delta["a"].tuned_weight.grad is not None and delta["a"].tuned_weight.grad.abs().sum() > 0
    pm.set_adapter(["a", "b"])
    out = pm(x)
    assert type(out.grad_fn).__name__ == "AddBackward0"
    torch.testing.assert_close(out, expected("a", "b"), atol=1e-5, rtol=1e-5)
    # "b" merged into the norm, "a" acting alone there: a's Δ is added to the layer's merged γ, β.
    pm.merge(["b"])
    with torch.no_grad():
        torch.testing.assert_close(pm(x), expected("a", "b"), atol=1e-5, rtol=1e-5)
