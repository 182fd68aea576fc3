"""LoHa and LoKr (the LyCORIS pair, PEFT's LOHA / LOKR): what is specific to them.

Math against naive formulas (explicit Hadamard product, explicit ``torch.kron``), PEFT's
initialisation reproduced draw for draw, trainable / changed / rank counts against the formula on
tiny Llama (PEFT files both ways: tests/test_interop_loha_lokr_oft_boft.py), batched mixed
batches in both LoHa paths, and the LyCORIS dropouts. Identity at init, save/load, merge, mixed
batches and training for the default configs are the registry-driven tests' (tests/test_engine.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftlab
from conftest import assert_mixed_batch_equals_per_adapter, randomize_adapter, spy_on_routed, tiny_net
from peftlab.core.config import ConfigError
from peftlab.methods.reparam.loha import LohaConfig, LohaLinear, hadamard_factors
from peftlab.methods.reparam.lokr import LokrConfig, LokrLinear, factorization, kron_apply

import peft  # noqa: E402  (a dev dependency)
from peft.tuners.lokr.layer import factorization as peft_factorization

pytestmark = pytest.mark.filterwarnings("ignore")
TOL = 1e-5


def delta_at(pm, name, adapter="default"):
    return next(d for _, n, d in pm.placements[adapter] if n == name)


# -- 1. math ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [2, 8], ids=["factored", "dense"])
def test_loha_linear_matches_hadamard_formula(r):
    base = nn.Linear(32, 24)
    d = LohaLinear(base, LohaConfig(r=r, alpha=3.0))
    assert d.factored is (r * r * (32 + 24) < 32 * 24)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()
    x = torch.randn(2, 5, 32)
    dw = (d.hada_w1_a @ d.hada_w1_b) * (d.hada_w2_a @ d.hada_w2_b) * (3.0 / r)
    torch.testing.assert_close(d(x, base(x)), x @ dw.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(d.delta_params(base)["weight"], dw.detach())
    u, v = hadamard_factors(d.hada_w1_a, d.hada_w1_b, d.hada_w2_a, d.hada_w2_b)
    assert u.shape == (24, r * r) and v.shape == (r * r, 32)
    torch.testing.assert_close(u @ v, dw / (3.0 / r), atol=1e-4, rtol=1e-5)
    assert torch.linalg.matrix_rank(dw).item() == d.rank() == min(r * r, 24)


def test_loha_on_gpt2_conv1d_matches_formula():
    g = tiny_net("gpt2")
    pm = peftlab.apply(g, "loha[r=4,alpha=4]")
    randomize_adapter(pm, std=0.2)
    c_attn = g.transformer.h[0].attn.c_attn  # Conv1D: weight (in, out)
    d = delta_at(pm, "transformer.h.0.attn.c_attn")
    dw = (d.hada_w1_a @ d.hada_w1_b) * (d.hada_w2_a @ d.hada_w2_b)  # (out, in), scale 1
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(c_attn(x), x @ (c_attn.weight + dw.T) + c_attn.bias, atol=1e-5, rtol=1e-5)


def test_kron_apply_equals_explicit_kron():
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(3, 4, generator=gen), torch.randn(5, 6, generator=gen)
    x = torch.randn(2, 7, 24, generator=gen)
    torch.testing.assert_close(kron_apply(x, w1, w2), x @ torch.kron(w1, w2).T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [LokrConfig(r=8, alpha=2.0), LokrConfig(r=1, decompose_both=True),
                                 LokrConfig(r=2, decompose_factor=4), LokrConfig(r=2, init="lycoris")],
                         ids=["full", "both_lowrank", "factor4", "lycoris"])
def test_lokr_linear_matches_kron_formula(cfg):
    base = nn.Linear(48, 32)
    d = LokrLinear(base, cfg)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()
    w1 = d.lokr_w1 if d.full_w1 else d.lokr_w1_a @ d.lokr_w1_b
    w2 = d.lokr_w2 if d.full_w2 else d.lokr_w2_a @ d.lokr_w2_b
    dw = torch.kron(w1, w2) * cfg.alpha / cfg.r
    x = torch.randn(3, 48)
    torch.testing.assert_close(d(x, base(x)), x @ dw.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(d.delta_params(base)["weight"], dw.detach())
    assert torch.linalg.matrix_rank(dw).item() == d.rank()
    assert torch.linalg.matrix_rank(dw).item() == torch.linalg.matrix_rank(w1).item() * torch.linalg.matrix_rank(w2).item()


def test_factorization_is_peft_rule():
    for n in range(1, 300):
        for f in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(n, f) == peft_factorization(n, f), (n, f)


# -- PEFT's initialisation, draw for draw ----------------------------------------------------------------
def _same_init(ours_cls, our_cfg, peft_layer_cls, peft_cfg, base):
    torch.manual_seed(7)
    ours = ours_cls(base, our_cfg)
    torch.manual_seed(7)
    theirs = peft_layer_cls(base, "default", config=peft_cfg, r=peft_cfg.r, alpha=peft_cfg.alpha)
    mine = ours.file_state()
    got = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if "default" in n}
    assert set(mine) == set(got)
    for k in mine:
        assert torch.equal(mine[k], got[k].detach()), k
    return mine


def test_init_is_peft_init():
    from peft.tuners.loha.layer import Linear as PeftLoha
    from peft.tuners.lokr.layer import Linear as PeftLokr

    base = nn.Linear(32, 16)
    st = _same_init(LohaLinear, LohaConfig(r=4), PeftLoha, peft.LoHaConfig(r=4, alpha=8), base)
    assert not st["hada_w2_b"].any() and st["hada_w1_a"].abs().max() <= 1 / math.sqrt(4)  # kaiming(a=√5) bound 1/√fan_in
    st = _same_init(LokrLinear, LokrConfig(r=4), PeftLokr, peft.LoKrConfig(r=4, alpha=8), base)
    assert not st["lokr_w1"].any()
    _same_init(LokrLinear, LokrConfig(r=1, decompose_both=True), PeftLokr,
               peft.LoKrConfig(r=1, alpha=8, decompose_both=True), base)
    st = _same_init(LokrLinear, LokrConfig(r=1, init="lycoris"), PeftLokr,
                    peft.LoKrConfig(r=1, alpha=8, init_weights="lycoris"), base)
    assert not st["lokr_w2_b"].any() and st["lokr_w1"].any()


# -- 3. counts -----------------------------------------------------------------------------------------
def test_counts_match_formula():
    # Tiny Llama, default targets q_proj (32 -> 32) and v_proj (32 -> 16), 2 layers.
    shapes = [(32, 32), (16, 32)] * 2
    changed = sum(o * i for o, i in shapes)
    rep = peftlab.apply(tiny_net("llama"), "loha[r=4]").report()
    assert rep["trainable_params"] == sum(2 * 4 * (o + i) for o, i in shapes)
    assert rep["changed_params"] == changed
    assert set(rep["ranks"].values()) == {16}  # min(r², out, in)

    # LoKr r=8: 32 = 4·8, 16 = 4·4; W2 full since r >= max(b, d)/2; W1 full (decompose_both off).
    rep = peftlab.apply(tiny_net("llama"), "lokr").report()
    assert rep["trainable_params"] == 2 * ((4 * 4 + 8 * 8) + (4 * 4 + 4 * 8))
    assert rep["changed_params"] == changed
    assert rep["ranks"]["model.layers.0.self_attn.q_proj"] == 4 * 8 and rep["ranks"]["model.layers.0.self_attn.v_proj"] == 4 * 4
    # r=1, decompose_both: W1 = (4x1)(1x4), W2 = (8x1)(1x8) or (4x1)(1x8): rank 1 · 1.
    rep = peftlab.apply(tiny_net("llama"), "lokr[r=1,decompose_both=true]").report()
    assert rep["trainable_params"] == 2 * ((4 + 4 + 8 + 8) + (4 + 4 + 4 + 8))
    assert set(rep["ranks"].values()) == {1}


# -- mixed batches -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec_a,spec_b,cls", [
    ("loha[r=2]", "loha[r=3,alpha=2]", LohaLinear),     # both factored (rank-r² factors, padded)
    ("loha[r=2]", "loha[r=8]", LohaLinear),             # one dense: gathered ΔW
    ("lokr[r=8]", "lokr[r=1,decompose_both=true]", LokrLinear),
])
def test_mixed_batches_are_batched(spec_a, spec_b, cls, monkeypatch):
    pm = peftlab.apply(tiny_net("llama"), spec_a, adapter_name="a")
    pm.add_adapter("b", spec_b)
    randomize_adapter(pm, "a", std=0.2, seed=1)
    randomize_adapter(pm, "b", std=0.2, seed=2)
    calls = spy_on_routed(monkeypatch, cls)
    assert_mixed_batch_equals_per_adapter(pm, ["a", "b", None])
    assert calls and all(calls)


def test_lokr_mixed_batch_with_different_factorizations_falls_back():
    pm = peftlab.apply(tiny_net("llama"), "lokr", adapter_name="a")
    pm.add_adapter("b", "lokr[decompose_factor=2]")  # 32 = 2·16 instead of 4·8
    randomize_adapter(pm, "a", std=0.2, seed=1)
    randomize_adapter(pm, "b", std=0.2, seed=2)
    assert_mixed_batch_equals_per_adapter(pm, ["b", "a", None])


# -- dropouts (training only) -------------------------------------------------------------------------------
def test_rank_and_module_dropout():
    base = nn.Linear(16, 64)
    d = LohaLinear(base, LohaConfig(r=2, rank_dropout=0.5))
    randomize = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=randomize))
    x = torch.randn(4, 16)
    full = d.eval()(x, base(x))
    torch.manual_seed(0)
    dropped = d.train()(x, base(x))
    ratio = dropped / full
    kept = ratio[0] != 0
    assert 0 < kept.sum() < 64  # whole output rows of ΔW dropped, the same for every input
    assert torch.equal(ratio != 0, kept.expand_as(ratio))
    torch.testing.assert_close(ratio[:, kept], torch.full_like(ratio[:, kept], 64 / kept.sum().item()))  # 1 / mean(mask)
    lokr = LokrLinear(base, LokrConfig(r=2, rank_dropout=0.5))  # rank_dropout_scale off: no rescale
    with torch.no_grad():
        lokr.lokr_w1.normal_()
    ratio = lokr.train()(x, base(x)) / lokr.eval()(x, base(x))
    assert set(ratio.unique().tolist()) <= {0.0, 1.0}
    never = LohaLinear(base, LohaConfig(r=2, module_dropout=0.999999))
    with torch.no_grad():
        never.hada_w2_b.normal_()
    assert not never.train()(x, base(x)).any() and never.eval()(x, base(x)).any()


# -- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw,field", [
    (LohaConfig, {"r": 0}, "r"), (LohaConfig, {"alpha": -1}, "alpha"), (LohaConfig, {"rank_dropout": 1.0}, "rank_dropout"),
    (LokrConfig, {"decompose_factor": 0}, "decompose_factor"), (LokrConfig, {"init": "zeros"}, "init"),
    (LokrConfig, {"module_dropout": -0.1}, "module_dropout"),
])
def test_bad_values_name_the_field(cls, kw, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kw)


def test_peft_patterns_are_refused(tmp_path):
    model = peft.get_peft_model(tiny_net("llama"), peft.LoHaConfig(r=4, target_modules=["q_proj"],
                                                                   rank_pattern={"q_proj": 2}))
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="rank_pattern"):
        peftlab.load(tiny_net("llama"), tmp_path)
