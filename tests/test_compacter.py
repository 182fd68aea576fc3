"""Compacter / Compacter++: PHM weights against explicit Kronecker products, the shared rule (one
Parameter per adapter: counted, saved, loaded and trained once), counts against the formula.

Identity at init, save/load, merge refusal, mixed batches, gradient isolation and training on a tiny
teacher are checked for every architecture by tests/test_engine.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftlab
from conftest import assert_gathered_mixed_batch, main_output, randomize_adapter, tiny_net
from peftlab.methods.additive.compacter import CompacterAdapter, CompacterConfig, phm_weight

out = main_output


def deltas(pm, adapter="default") -> dict[str, CompacterAdapter]:
    return {n: d for _, n, d in pm.placements[adapter]}


def naive_phm(rule, s, t):
    """Σ_i kron(A_i, s_i t_iᵀ) with torch.kron."""
    return sum(torch.kron(rule[i], s[i] @ t[i].T) for i in range(rule.shape[0]))


# -- 1. math --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,out_n,in_n,r", [(4, 2, 8, 1), (2, 3, 5, 2), (3, 1, 1, 3)])
def test_phm_weight_equals_sum_of_kronecker_products(n, out_n, in_n, r):
    g = torch.Generator().manual_seed(n + r)
    rule, s, t = (torch.randn(shape, generator=g, dtype=torch.float64)
                  for shape in ((n, n, n), (n, out_n, r), (n, in_n, r)))
    w = phm_weight(rule, s, t)
    assert w.shape == (n * out_n, n * in_n)
    torch.testing.assert_close(w, naive_phm(rule, s, t), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind,module", [("llama", "model.layers.1.mlp.down_proj"), ("gpt2", "transformer.h.0.attn.c_proj")])
def test_module_output_matches_formula(kind, module):
    """y + W_up σ(W_down y + b_down) + b_up with W = Σ kron(A_i, s_i t_iᵀ), the shared A."""
    model = tiny_net(kind)
    pm = peftlab.apply(model, "compacter[n=2,r=2,reduction_factor=8,activation=silu]")
    randomize_adapter(pm, std=0.3)
    d = deltas(pm)[module]
    layer = model.get_submodule(module)
    x = torch.randn(2, 5, layer.weight.shape[0] if kind == "gpt2" else layer.in_features)
    with torch.no_grad(), pm.disable_adapters():
        y = layer(x)
    A = d.phm_rule
    w_down = naive_phm(A, d.adapter_down.s, d.adapter_down.t)
    w_up = naive_phm(A, d.adapter_up.s, d.adapter_up.t)
    assert w_down.shape == (4, 32) and w_up.shape == (32, 4)  # m = 32 // 8
    expected = y + F.silu(y @ w_down.T + d.adapter_down.bias) @ w_up.T + d.adapter_up.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_up_projection_is_zero_at_init_and_down_is_not():
    pm = peftlab.apply(tiny_net("bert"), "compacter")
    for d in deltas(pm).values():
        w_down, _, w_up, b_up = d.weights()
        assert torch.count_nonzero(w_up) == 0 and torch.count_nonzero(b_up) == 0
        assert torch.count_nonzero(w_down) == w_down.numel()


# -- the shared rule -------------------------------------------------------------------------------
def test_rule_is_one_parameter_per_adapter():
    model = tiny_net("bert")
    pm = peftlab.apply(model, "compacter", adapter_name="a")
    pm.add_adapter("b", "compacter")
    rules_a = {id(d.phm_rule) for d in deltas(pm, "a").values()}
    rules_b = {id(d.phm_rule) for d in deltas(pm, "b").values()}
    assert len(rules_a) == 1 and len(rules_b) == 1 and rules_a != rules_b
    a_params = [p for p, _ in pm.adapter_parameters("a")]
    assert sum(p is next(iter(deltas(pm, "a").values())).phm_rule for p in a_params) == 1
    # The optimizer sees the rule once.
    pm.set_adapter("a")
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert len({id(p) for p in trainable}) == len(trainable)
    assert pm.get_nb_trainable_parameters()[0] == pm.report("a")["trainable_params"]


def test_rule_gradient_collects_every_layer():
    """∂L/∂A is the sum over the layers that use A (one shared leaf)."""
    model = tiny_net("llama")
    pm = peftlab.apply(model, "compacter_pp")
    randomize_adapter(pm, std=0.3)
    ds = list(deltas(pm).values())
    rule = ds[0].phm_rule
    out = pm(input_ids=torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))).logits
    out.pow(2).mean().backward()
    full = rule.grad.clone()
    # Recompute with the rule detached in all but one delta: the per-layer parts add up to the whole.
    parts = []
    for keep in range(len(ds)):
        rule.grad = None
        x = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
        frozen = torch.nn.Module()
        frozen.weight = rule.detach()
        for i, d in enumerate(ds):
            if i != keep:
                d._modules["shared"] = frozen
        pm(input_ids=x).logits.pow(2).mean().backward()
        for d in ds:
            d._modules["shared"] = ds[keep].shared
        parts.append(rule.grad.clone())
    assert all(p.abs().sum() > 0 for p in parts)
    torch.testing.assert_close(sum(parts), full, atol=1e-6, rtol=1e-5)


def test_rule_stays_shared_when_the_base_is_cast():
    """Each delta follows its own module's cast (core/follow.py); the rule is cast once and stays
    one Parameter, and every delta's own factors are cast too."""
    model = tiny_net("llama")
    pm = peftlab.apply(model, "compacter")
    randomize_adapter(pm, std=0.3)
    expected = out(pm).double()
    model.to(torch.float64)
    got = out(pm)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    ds = list(deltas(pm).values())
    assert len({id(d.phm_rule) for d in ds}) == 1
    assert {p.dtype for p in pm.adapter_modules["default"].parameters()} == {torch.float64}


def test_files_hold_the_rule_once_and_load_it_shared(tmp_path):
    pm = peftlab.apply(tiny_net("llama"), "compacter[n=2]")
    randomize_adapter(pm, std=0.3)
    expected = out(pm)
    tensors = pm.adapter_tensors()
    rule_keys = [k for k in tensors if k.endswith("phm_rule")]
    assert rule_keys == ["base_model.phm_rule"]
    assert {k.split(".")[-2] for k in tensors if k not in rule_keys} == {"adapter_down", "adapter_up"}
    assert len(tensors) == 1 + 4 * 6  # rule + (s, t, bias) x (down, up) per module
    pm.save(tmp_path)
    loaded = peftlab.load(tiny_net("llama"), tmp_path)
    torch.testing.assert_close(out(loaded), expected, atol=1e-6, rtol=0)
    ds = list(deltas(loaded).values())
    assert len({id(d.phm_rule) for d in ds}) == 1
    torch.testing.assert_close(ds[-1].phm_rule, pm.placements["default"][0][2].phm_rule)


# -- 3. counts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2", "vit"])
@pytest.mark.parametrize("spec,n,r,m,modules", [
    ("compacter", 4, 1, 4, 4),  # 32 // 32 = 1, rounded up to n = 4
    ("compacter_pp", 4, 1, 4, 2),
    ("compacter[n=2,r=3,reduction_factor=4]", 2, 3, 8, 4),
    ("compacter_pp[n=8,reduction_factor=16]", 8, 1, 8, 2),  # 2 -> 8
])
def test_counts_match_formula(kind, spec, n, r, m, modules):
    d = 32
    pm = peftlab.apply(tiny_net(kind), spec)
    per_module = r * (d + m) + m + r * (m + d) + d  # down: s, t, bias; up: s, t, bias
    rep = pm.report()
    assert rep["trainable_params"] == rep["changed_params"] == rep["adapter_params"] == n ** 3 + modules * per_module
    assert rep["modules"] == modules and rep["ranks"] == {}
    assert all(dl.r == m for _, _, dl in pm.placements["default"])


# -- mixed batches ----------------------------------------------------------------------------------
def test_mixed_batch_of_different_n_r_and_activation_is_one_gathered_call(monkeypatch):
    assert_gathered_mixed_batch(monkeypatch, CompacterAdapter, tiny_net("gpt2"), "compacter",
                                "compacter[n=2,r=2,reduction_factor=4,activation=relu]", std=0.3)


# -- config ----------------------------------------------------------------------------------------
def test_config_and_errors():
    cfg = peftlab.parse_method_string("compacter[n=2,r=3,reduction_factor=8]")
    assert isinstance(cfg, CompacterConfig) and (cfg.n, cfg.r, cfg.reduction_factor) == (2, 3, 8)
    assert peftlab.parse_method_string(cfg.to_string()) == cfg
    assert CompacterConfig().activation == "gelu" and CompacterConfig().reduction_factor == 32
    with pytest.raises(peftlab.ConfigError, match="CompacterConfig.n=0"):
        CompacterConfig(n=0)
    with pytest.raises(peftlab.ConfigError, match="rank"):
        peftlab.parse_method_string("compacter[r=-1]")
    with pytest.raises(peftlab.TargetError, match="n=3 must divide the hidden size 32"):
        peftlab.apply(tiny_net("bert"), "compacter[n=3]")
