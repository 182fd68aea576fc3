"""OFT and BOFT (PEFT's OFT / BOFT): what is specific to them.

The shared math of ``methods/reparam/orthogonal.py`` against naive formulas (explicit skew matrices,
Cayley with ``torch.linalg.inv``, ``torch.block_diag``, permutation matrices) and against PEFT's own
pieces; orthogonality RᵀR = I; the layers' outputs and merged weights against W0 BD(R)ᵀ and
diag(s) W0 Mᵀ; counts on tiny Llama; batched mixed batches. PEFT files both ways:
tests/test_interop_loha_lokr_oft_boft.py. Identity at init, save/load, merge, mixed batches and
training of the default configs are the registry-driven tests' (tests/test_engine.py).
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

import peftlab
from conftest import assert_mixed_batch_equals_per_adapter, randomize_adapter, spy_on_routed, tiny_net
from peftlab.core.config import ConfigError
from peftlab.methods.reparam.boft import BoftConfig, BoftLinear
from peftlab.methods.reparam.oft import OftConfig, OftLinear
from peftlab.methods.reparam.orthogonal import (
    butterfly_perm,
    cayley,
    cayley_neumann,
    identity_dropout,
    nearest_divisor,
    skew_from_square,
    skew_from_upper,
)

import peft  # noqa: E402  (a dev dependency)
from peft.tuners.boft.layer import BOFTLayer
from peft.tuners.oft.layer import OFTLayer, OFTRotationModule

pytestmark = pytest.mark.filterwarnings("ignore")
TOL = 1e-5
GEN = torch.Generator().manual_seed(0)


def naive_cayley(s):
    """(I − S)(I + S)⁻¹ with an explicit inverse."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype)
    return (eye - s) @ torch.linalg.inv(eye + s)


def skew(b, n_blocks=3, scale=0.3):
    a = torch.randn(n_blocks, b, b, generator=GEN, dtype=torch.float64) * scale
    return a - a.transpose(-1, -2)


# -- 1. the shared math ---------------------------------------------------------------------------------
def test_skew_layouts():
    vec = torch.randn(2, 6, generator=GEN)
    s = skew_from_upper(vec, 4)
    assert torch.equal(s, -s.transpose(-1, -2))
    rows, cols = torch.triu_indices(4, 4, 1)
    assert torch.equal(s[:, rows, cols], vec) and torch.equal(s[:, 0, 1], vec[:, 0]) and torch.equal(s[:, 2, 3], vec[:, 5])
    a = torch.randn(3, 4, 4, generator=GEN)
    torch.testing.assert_close(skew_from_square(a), (a - a.transpose(-1, -2)) / 2)


def test_cayley_is_orthogonal_and_matches_explicit_inverse():
    s = skew(8)
    r = cayley(s)
    torch.testing.assert_close(r, naive_cayley(s))
    eye = torch.eye(8, dtype=s.dtype).expand_as(r)
    assert (r.transpose(-1, -2) @ r - eye).abs().max().item() < 1e-5
    assert (r @ r.transpose(-1, -2) - eye).abs().max().item() < 1e-5
    # The textbook form (I + Q)(I − Q)⁻¹ of Q = −S.
    q = -s
    torch.testing.assert_close(r, (eye + q) @ torch.linalg.inv(eye - q))
    assert torch.equal(cayley(torch.zeros(2, 5, 5)), torch.eye(5).expand(2, 5, 5))
    assert (r.float().transpose(-1, -2) @ r.float() - torch.eye(8)).abs().max().item() < 1e-5  # float32 too


def test_cayley_neumann_series_and_peft():
    s = skew(6, scale=0.05)
    eye = torch.eye(6, dtype=s.dtype)
    series = eye + 2 * s + 2 * s @ s + 2 * s @ s @ s + s @ s @ s @ s
    torch.testing.assert_close(cayley_neumann(s, 5), series)
    # It approximates (I + S)(I − S)⁻¹: the opposite sign of S from the exact form, as in PEFT.
    small = s / 5
    assert (cayley_neumann(small, 5) - (eye + small) @ torch.linalg.inv(eye - small)).abs().max() < 1e-5
    assert (cayley_neumann(small, 5) - cayley(small)).abs().max() > 1e-2
    mod = OFTRotationModule(3, 15, 6, 18)
    vec = torch.randn(3, 15, generator=GEN) * 0.1
    for terms in range(1, 8):
        theirs = mod._cayley_batch(vec, 6, use_cayley_neumann=True, num_neumann_terms=terms)
        torch.testing.assert_close(cayley_neumann(skew_from_upper(vec, 6), terms), theirs, atol=1e-6, rtol=1e-6)
    theirs = mod._cayley_batch(vec, 6, use_cayley_neumann=False)
    torch.testing.assert_close(cayley(skew_from_upper(vec, 6)), theirs, atol=1e-6, rtol=1e-6)


def test_block_sizes_are_adjusted_as_peft():
    for n in (12, 32, 48, 96, 100):
        for wanted in range(1, n + 3):
            assert nearest_divisor(n, wanted) == OFTLayer.adjust_oft_parameters(None, n, wanted), (n, wanted)
    with pytest.warns(UserWarning, match="using 4"):
        d = OftLinear(nn.Linear(32, 8), OftConfig(block_size=5))
    assert (d.blocks, d.block_size) == (8, 4)


def test_butterfly_perm_is_peft_perm():
    for n, num, size, factors in [(32, 8, 4, 2), (32, 8, 4, 4), (64, 4, 16, 3), (48, 12, 4, 3), (16, 2, 8, 2)]:
        for i in range(factors):
            ours = butterfly_perm(n, num // 2**i, size // 2, factors - 1)
            assert torch.equal(ours, BOFTLayer.block_butterfly_perm(None, n, num // 2**i, size // 2, factors - 1))


def test_identity_dropout_replaces_floor_p_blocks():
    blocks = cayley(skew(4, n_blocks=10))
    out = identity_dropout(blocks, 0.35)
    is_eye = [torch.equal(b, torch.eye(4, dtype=b.dtype)) for b in out]
    assert sum(is_eye) == 3 and all(torch.equal(o, b) for o, b, e in zip(out, blocks, is_eye) if not e)


# -- OFT layer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [OftConfig(block_size=8), OftConfig(r=2, block_size=0), OftConfig(block_size=4, block_share=True),
                                 OftConfig(block_size=8, neumann=True)], ids=["exact", "r", "share", "neumann"])
def test_oft_layer_matches_naive_formula(cfg):
    base = nn.Linear(32, 24)
    d = OftLinear(base, cfg)
    with torch.no_grad():
        d.oft_R["weight"].normal_(0, 0.1, generator=GEN)
    b = d.block_size
    vecs = d.oft_R["weight"].detach().expand(d.blocks, -1) if cfg.block_share else d.oft_R["weight"].detach()
    s = torch.stack([skew_from_upper(v, b) for v in vecs])
    if cfg.neumann:
        eye = torch.eye(b)
        blocks = [eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q for q in s]
    else:
        blocks = list(naive_cayley(s))
    bd = torch.block_diag(*blocks)
    x = torch.randn(2, 5, 32, generator=GEN)
    torch.testing.assert_close(d(x), x @ bd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.delta_params(base)["weight"], (base.weight @ bd.T - base.weight).detach(), atol=1e-5, rtol=1e-5)
    if not cfg.neumann:
        torch.testing.assert_close(bd.T @ bd, torch.eye(32), atol=1e-5, rtol=0)
        torch.testing.assert_close(d(x).norm(dim=-1), x.norm(dim=-1))  # a rotation keeps ‖x‖


def test_oft_on_gpt2_conv1d_rotates_the_input():
    g = tiny_net("gpt2", noisy_biases=True)
    c_attn = g.transformer.h[1].attn.c_attn
    w0, b0 = c_attn.weight.detach().clone(), c_attn.bias.detach().clone()
    pm = peftlab.apply(g, "oft[block_size=8]")
    randomize_adapter(pm, std=0.1)
    rot = next(d for _, n, d in pm.placements["default"] if n == "transformer.h.1.attn.c_attn").rotation().detach()
    x = torch.randn(2, 3, 32, generator=GEN)
    torch.testing.assert_close(c_attn(x), x @ torch.block_diag(*rot) @ w0 + b0, atol=1e-5, rtol=1e-5)
    pm.merge()
    torch.testing.assert_close(c_attn.weight, torch.block_diag(*rot) @ w0, atol=1e-5, rtol=1e-5)  # Conv1D stores W0ᵀ
    assert torch.equal(c_attn.bias, b0)


# -- BOFT layer ------------------------------------------------------------------------------------------
def peft_butterfly(boft_R, n, block_num, block_size):
    """M assembled as PEFT's BOFT does (its cayley_batch, block_butterfly_perm and perm2mat)."""
    m, d, b, _ = boft_R.shape
    rot = BOFTLayer.cayley_batch(None, boft_R.reshape(m * d, b, b)).reshape(m, d, b, b)
    out = None
    for i in range(m):
        perm = BOFTLayer.block_butterfly_perm(None, n, block_num // 2**i, block_size // 2, m - 1)
        p = BOFTLayer.perm2mat(None, perm)
        f = p @ torch.block_diag(*rot[i]) @ p.T
        out = f if out is None else f @ out
    return out


@pytest.mark.parametrize("cfg", [BoftConfig(block_size=4), BoftConfig(block_size=4, n_butterfly_factor=2),
                                 BoftConfig(block_num=4, block_size=0, n_butterfly_factor=3),
                                 BoftConfig(block_size=4, n_butterfly_factor=4)], ids=["m1", "m2", "num4_m3", "m4_dense"])
def test_boft_layer_matches_naive_formula(cfg):
    base = nn.Linear(32, 24)
    with torch.no_grad():
        base.bias.normal_(generator=GEN)
    d = BoftLinear(base, cfg)
    with torch.no_grad():
        d.boft_R.normal_(0, 0.2, generator=GEN)
        d.boft_s.normal_(1, 0.1, generator=GEN)
    m, num, b = cfg.n_butterfly_factor, d.block_num, d.block_size
    # Naive: explicit inverse, block_diag and permutation matrices, product B_{m-1} ... B_0.
    dense = None
    for i in range(m):
        s = (d.boft_R[i] - d.boft_R[i].transpose(-1, -2)).detach() / 2
        perm = butterfly_perm(32, num // 2**i, b // 2, m - 1)
        p = torch.zeros(32, 32)
        p[torch.arange(32), perm] = 1
        f = p @ torch.block_diag(*naive_cayley(s)) @ p.T
        dense = f if dense is None else f @ dense
    torch.testing.assert_close(dense, peft_butterfly(d.boft_R.detach(), 32, num, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.dense_rotation().detach(), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.T @ dense, torch.eye(32), atol=1e-5, rtol=0)
    if m == 4:  # block 4 · 2^(m−1) = 32: the butterfly product is dense
        assert (dense.abs() > 0).all()
    s_col = d.boft_s.detach().unsqueeze(1)
    x = torch.randn(2, 5, 32, generator=GEN)
    want = (x @ dense) @ (s_col * base.weight).T.detach() + base.bias.detach()  # s ⊙ (W0 Mᵀ x) + b
    torch.testing.assert_close(base(x) + d(x, base(x)), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.delta_params(base)["weight"], (s_col * base.weight @ dense.T - base.weight).detach(),
                               atol=1e-5, rtol=1e-5)


def test_boft_refuses_layouts_peft_refuses():
    with pytest.raises(ConfigError, match="block_size"):
        BoftLinear(nn.Linear(30, 8), BoftConfig(block_size=4))
    with pytest.raises(ConfigError, match="block_size"):
        BoftLinear(nn.Linear(32, 8), BoftConfig(block_size=8, n_butterfly_factor=4))  # 8 · 2³ > 32
    with pytest.raises(ConfigError, match="n_butterfly_factor"):
        BoftLinear(nn.Linear(36, 8), BoftConfig(block_num=4, block_size=0, n_butterfly_factor=2))  # odd block size 9
    with pytest.raises(ConfigError, match="block_num"):
        BoftConfig(block_size=4, block_num=2)


def test_boft_dropout_acts_in_training_only():
    base = nn.Linear(32, 8)
    d = BoftLinear(base, BoftConfig(block_size=4, dropout=0.5))
    with torch.no_grad():
        d.boft_R.normal_(0, 0.3, generator=GEN)
    eye = torch.eye(4)
    assert sum(torch.allclose(r, eye) for r in d.eval().rotation_blocks()[0]) == 0
    assert sum(torch.allclose(r, eye) for r in d.train().rotation_blocks()[0]) == 4


# -- 3. counts -------------------------------------------------------------------------------------------
def test_counts_match_formula():
    # Tiny Llama, default targets q_proj (32 -> 32) and v_proj (32 -> 16), 2 layers.
    changed = 2 * (32 * 32 + 16 * 32)
    rep = peftlab.apply(tiny_net("llama"), "oft").report()  # one block of 32 per module: 32·31/2
    assert rep["trainable_params"] == 4 * 32 * 31 // 2 and rep["changed_params"] == changed
    rep = peftlab.apply(tiny_net("llama"), "oft[block_size=8,block_share=true]").report()
    assert rep["trainable_params"] == 4 * 8 * 7 // 2
    assert rep["ranks"] == {n: min(32, o) for n, o in [(f"model.layers.{i}.self_attn.{p}", o) for i in (0, 1)
                                                        for p, o in (("q_proj", 32), ("v_proj", 16))]}
    rep = peftlab.apply(tiny_net("llama"), "boft[block_size=4,n_butterfly_factor=2]").report()
    # boft_R: 2 factors × 8 blocks × 4×4 (PEFT's full squares), boft_s: one per output row.
    assert rep["trainable_params"] == 4 * (2 * 8 * 16) + 2 * (32 + 16) and rep["changed_params"] == changed


@pytest.mark.parametrize("spec", ["oft[block_size=8]", "boft[block_size=4,n_butterfly_factor=2]"])
def test_rank_of_delta_w_is_the_declared_bound(spec):
    model = tiny_net("llama")
    pm = peftlab.apply(model, spec)
    randomize_adapter(pm, std=0.1)
    for _, name, d in pm.placements["default"]:
        dw = d.delta_params(model.get_submodule(name))["weight"]
        assert torch.linalg.matrix_rank(dw).item() == d.rank() == min(dw.shape), name  # even blocks: R − I invertible


# -- mixed batches -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec_a,spec_b,cls,batched", [
    ("oft[block_size=8]", "oft[block_size=8,neumann=true]", OftLinear, True),
    ("oft[block_size=8]", "oft[block_size=4]", OftLinear, False),   # blocks differ: one sub-batch per adapter
    ("boft[n_butterfly_factor=2]", "boft[n_butterfly_factor=2]", BoftLinear, True),
    ("boft", "boft[n_butterfly_factor=3]", BoftLinear, False),
])
def test_mixed_batches(spec_a, spec_b, cls, batched, monkeypatch):
    pm = peftlab.apply(tiny_net("llama"), spec_a, adapter_name="a")
    pm.add_adapter("b", spec_b)
    randomize_adapter(pm, "a", std=0.1, seed=1)
    randomize_adapter(pm, "b", std=0.1, seed=2)
    calls = spy_on_routed(monkeypatch, cls)
    assert_mixed_batch_equals_per_adapter(pm, ["a", None, "b"])
    assert calls and all(calls) is batched


# -- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw,field", [
    (OftConfig, {"r": 4}, "block_size"), (OftConfig, {"block_size": 0}, "block_size"), (OftConfig, {"r": -1}, "r"),
    (OftConfig, {"neumann_terms": 0}, "neumann_terms"), (BoftConfig, {"n_butterfly_factor": 0}, "n_butterfly_factor"),
    (BoftConfig, {"dropout": 1.5}, "dropout"), (BoftConfig, {"block_size": -4}, "block_size"),
])
def test_bad_values_name_the_field(cls, kw, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kw)


def test_coft_files_are_refused(tmp_path):
    model = peft.get_peft_model(tiny_net("llama"), peft.OFTConfig(oft_block_size=8, coft=True, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="coft"):
        peftlab.load(tiny_net("llama"), tmp_path)
