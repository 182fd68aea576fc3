"""The LoRA family against direct formulas: LoRA, rsLoRA, DoRA, LoRA-FA, inits, layer kinds, LoRA+."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftlab
from peftlab.zoo import tiny_batch, tiny_model

from conftest import first_output, randomize_adapter


class Toy(nn.Module):
    """A plain nn.Module: a linear, an embedding and a conv (not a Hugging Face model)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 12)
        self.proj = nn.Linear(12, 10)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, ids, image):
        return self.proj(self.emb(ids)), self.conv(image)


def _delta(pm, module_name, adapter="default"):
    return next(d for _, n, d in pm.placements[adapter] if n == module_name)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_matches_formula(rslora):
    model = Toy()
    pm = peftlab.apply(model, peftlab.LoraConfig(r=4, alpha=8, targets=["proj"], rslora=rslora))
    randomize_adapter(pm)
    d = _delta(pm, "proj")
    x = torch.randn(2, 5, 12)
    s = 8 / (math.sqrt(4) if rslora else 4)
    A, B = d.lora_A.weight, d.lora_B.weight
    expected = x @ model.proj.weight.T + model.proj.bias + s * (x @ A.T @ B.T)
    torch.testing.assert_close(model.proj(x), expected, atol=1e-5, rtol=1e-5)


def test_lora_embedding_and_conv_match_formula():
    model = Toy()
    pm = peftlab.apply(model, "lora[r=2,alpha=4,targets=emb|conv]")
    randomize_adapter(pm)
    ids, image = torch.randint(0, 20, (2, 6)), torch.randn(2, 3, 8, 8)
    e, c = _delta(pm, "emb"), _delta(pm, "conv")
    w_emb = model.emb.weight + 2.0 * (e.lora_embedding_B @ e.lora_embedding_A).T
    torch.testing.assert_close(model.emb(ids), w_emb[ids], atol=1e-5, rtol=1e-5)
    dw = torch.einsum("or,rikl->oikl", c.lora_B.weight.flatten(1), c.lora_A.weight)
    expected = torch.nn.functional.conv2d(image, model.conv.weight + 2.0 * dw, model.conv.bias, padding=1)
    torch.testing.assert_close(model.conv(image), expected, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_lora_matches_formula():
    model = tiny_model("gpt2")
    pm = peftlab.apply(model, "lora[r=4,alpha=4,targets=c_attn]")
    randomize_adapter(pm)
    layer = model.transformer.h[0].attn.c_attn
    d = _delta(pm, "transformer.h.0.attn.c_attn")
    x = torch.randn(2, 3, 32)
    expected = x @ layer.weight + layer.bias + (x @ d.lora_A.weight.T) @ d.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_dora_matches_formula_and_identity():
    model = Toy()
    x = torch.randn(4, 12)
    base = model.proj(x)
    pm = peftlab.apply(model, "dora[r=4,alpha=8,targets=proj]")
    torch.testing.assert_close(model.proj(x), base, atol=1e-6, rtol=0)
    randomize_adapter(pm)
    d = _delta(pm, "proj")
    W = model.proj.weight
    V = W + 2.0 * d.lora_B.weight @ d.lora_A.weight
    W_new = d.lora_magnitude_vector.unsqueeze(1) * V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model.proj(x), x @ W_new.T + model.proj.bias, atol=1e-5, rtol=1e-5)


def test_dora_magnitude_init_is_weight_norm():
    model = Toy()
    pm = peftlab.apply(model, "dora[targets=proj]")
    torch.testing.assert_close(_delta(pm, "proj").lora_magnitude_vector, model.proj.weight.norm(dim=1))


def test_lora_fa_freezes_A_and_trains_B_only():
    model = tiny_model("llama")
    pm = peftlab.apply(model, "lora_fa[r=4]")
    d = _delta(pm, "model.layers.0.self_attn.q_proj")
    assert not d.lora_A.weight.requires_grad and d.lora_B.weight.requires_grad
    A = d.lora_A.weight
    torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)  # orthogonal rows
    report = pm.report()
    outs = [dd.lora_B.weight.shape[0] for _, _, dd in pm.placements["default"]]
    assert report["trainable_params"] == sum(4 * o for o in outs) == 2 * 4 * (32 + 16)
    batch = tiny_batch(model)
    first_output(pm(**batch)).sum().backward()
    assert d.lora_A.weight.grad is None and d.lora_B.weight.grad is not None


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_are_identity_and_start_from_top_factors(init):
    model = Toy()
    x = torch.randn(3, 12)
    base = model.proj(x)
    pm = peftlab.apply(model, f"lora[r=4,alpha=4,init={init},targets=proj]")
    torch.testing.assert_close(model.proj(x), base, atol=1e-5, rtol=0)
    d = _delta(pm, "proj")
    BA = d.lora_B.weight @ d.lora_A.weight
    W = model.proj.weight
    if init == "pissa":  # B A is the best rank-4 approximation of W
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(BA, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=1e-4)
    else:  # OLoRA: B has orthonormal columns
        torch.testing.assert_close(d.lora_B.weight.T @ d.lora_B.weight, torch.eye(4), atol=1e-5, rtol=0)
    assert pm.report()["ranks"]["proj"] == 8  # ΔW = s(BA - B0A0) has rank ≤ 2r


def test_gaussian_init_std():
    model = nn.Sequential(nn.Linear(512, 512))
    pm = peftlab.apply(model, "lora[r=8,init=gaussian,targets=0]")
    std = _delta(pm, "0").lora_A.weight.std().item()
    assert abs(std - 1 / 8) < 0.01


def test_counts_match_formula(tiny):
    model, _ = tiny("llama")
    pm = peftlab.apply(model, "lora[r=4,targets=q_proj|v_proj]")
    r = pm.report()
    hidden, kv = 32, 16  # q_proj 32->32, v_proj 32->16 (2 of 4 heads), 2 layers
    assert r["trainable_params"] == 2 * (4 * (32 + 32) + 4 * (32 + kv))
    assert r["changed_params"] == 2 * (hidden * 32 + hidden * kv)
    assert r["ranks"] == {f"model.layers.{i}.self_attn.{p}": 4 for i in range(2) for p in ("q_proj", "v_proj")}
    assert r["total_params"] == r["base_params"] + r["adapter_params"]


def test_dropout_trains_without_copying_input_and_is_deterministic_under_seed():
    model = Toy()
    pm = peftlab.apply(model, "lora[r=4,dropout=0.5,targets=proj]")
    randomize_adapter(pm)
    pm.train()
    x = torch.randn(6, 12, requires_grad=True)
    torch.manual_seed(1)
    y1 = model.proj(x)
    torch.manual_seed(1)
    y2 = model.proj(x)
    torch.testing.assert_close(y1, y2)
    pm.eval()
    assert not torch.allclose(model.proj(x), y2), "eval mode has no dropout"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_seeded_dropout_gradients_equal_autograd_through_the_explicit_mask(p):
    from peftlab.methods.reparam.lora import _DropoutThenLinear, keep_mask

    x = torch.randn(3, 5, 12, requires_grad=True)
    A = torch.randn(4, 12, requires_grad=True)
    out = _DropoutThenLinear.apply(x, A, p, 1234)
    g = torch.randn_like(out)
    gx, gA = torch.autograd.grad(out, (x, A), g)

    keep, scale = keep_mask(x.shape, x.device, p, 1234)
    ref = torch.nn.functional.linear(x * keep * scale, A)
    rx, rA = torch.autograd.grad(ref, (x, A), g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gA, rA, atol=1e-5, rtol=1e-5)
    assert not keep.all() and keep.any()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_mask_drops_p_of_entries_uniformly_and_is_unbiased(p):
    from peftlab.methods.reparam.lora import keep_mask

    keep, scale = keep_mask((400, 1000), torch.device("cpu"), p, seed=7)
    assert torch.equal(keep, keep_mask((400, 1000), torch.device("cpu"), p, seed=7)[0])  # a function of the seed
    assert not torch.equal(keep, keep_mask((400, 1000), torch.device("cpu"), p, seed=8)[0])
    sd = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs((1 - keep.float().mean().item()) - p) < 5 * sd + 2**-15
    assert abs(keep.float().mean().item() * scale - 1) < 5 * sd / (1 - p) + 1e-6  # E[mask * scale] = 1
    # Four draws share one random int64: every position in the group of four drops at rate p.
    for j in range(4):
        assert abs((1 - keep.reshape(-1, 4)[:, j].float().mean().item()) - p) < 5 * 2 * sd + 2**-15


def test_param_groups_loraplus(tiny):
    model, _ = tiny("llama")
    pm = peftlab.apply(model, "lora[r=4]")
    groups = {g["name"]: g for g in peftlab.param_groups(pm, lr=1e-3, loraplus_ratio=16)}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert all("lora_B" not in n for n, p in pm.named_parameters() if any(p is q for q in groups["no_decay"]["params"]))
    n_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable


