"""FourierFT: what is specific to it. Identity at init, save/load, merge, mixed batches and training
are the registry-driven checks of test_engine.py.

ΔW = α · Re(IDFT2(S)), S zero but for n trainable coefficients at seeded random frequencies.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch

import peftlab
from conftest import randomize_adapter, tiny_net
from peft_both_ways import assert_same_and_adapted, ours_in_peft, peft_in_ours
from peftlab.methods.reparam.fourierft import FourierLinear, fourier_weight, spectrum_indices
from peftlab.zoo import tiny_batch

pytestmark = pytest.mark.filterwarnings("ignore")


def delta_at(pm, name: str) -> FourierLinear:
    return next(d for _, n, d in pm.placements["default"] if n == name)


# -- 1. math ----------------------------------------------------------------------------------------
def test_ifft2_matches_a_direct_dft_sum():
    """ΔW[p, q] = α / (M N) Σ_j c_j cos(2π (u_j p / M + v_j q / N)) for real c (the real part of the
    inverse DFT of the sparse spectrum), summed term by term."""
    M, N, n, alpha = 5, 7, 6, 3.0
    idx = spectrum_indices(M, N, n, seed=4)
    c = torch.randn(n)
    fast = fourier_weight(c, idx, (M, N), alpha).double()  # float32, as PEFT computes it
    naive = torch.zeros(M, N, dtype=torch.float64)
    for p in range(M):
        for q in range(N):
            naive[p, q] = alpha / (M * N) * sum(
                c[j] * math.cos(2 * math.pi * (idx[0, j].item() * p / M + idx[1, j].item() * q / N)) for j in range(n))
    torch.testing.assert_close(fast, naive, atol=1e-6, rtol=1e-5)
    assert naive.abs().max() > 0.1


def test_frequencies_are_peft_draw_and_shared_by_layers_of_a_shape():
    perm = torch.randperm(32 * 16, generator=torch.Generator().manual_seed(9))[:50]
    assert torch.equal(spectrum_indices(16, 32, 50, seed=9), torch.stack([perm // 32, perm % 32]))
    pm = peftlab.apply(tiny_net("llama"), "fourierft[n_frequency=50,seed=9]")
    v0, v1 = (delta_at(pm, f"model.layers.{i}.self_attn.v_proj") for i in (0, 1))
    assert torch.equal(v0.indices, v1.indices) and torch.equal(v0.indices, spectrum_indices(16, 32, 50, 9))


def test_layer_output_and_merge_match_formula():
    model = tiny_net("gpt2")  # Conv1D: weight stored (in, out)
    pm = peftlab.apply(model, "fourierft[n_frequency=100,scaling=20,targets=c_attn]")
    randomize_adapter(pm, std=0.5)
    name = "transformer.h.0.attn.c_attn"
    d, layer = delta_at(pm, name), model.get_submodule(name)
    dense = torch.zeros(96, 32)
    dense[d.indices[0], d.indices[1]] = d.fourierft_spectrum.detach()
    dW = 20 * torch.fft.ifft2(dense).real  # (out, in)
    x, w0 = torch.randn(2, 4, 32), layer.weight.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (w0 + dW.T) + layer.bias, atol=1e-5, rtol=1e-5)
        pm.merge()
        torch.testing.assert_close(layer.weight, w0 + dW.T, atol=1e-6, rtol=1e-5)


# -- 3. counts --------------------------------------------------------------------------------------
def test_counts_match_formula():
    n, layers = 300, 2
    rep = peftlab.apply(tiny_net("llama"), f"fourierft[n_frequency={n}]").report()  # q 32x32, v 16x32
    assert rep["trainable_params"] == layers * (n + n)
    assert rep["changed_params"] == layers * (32 * 32 + 16 * 32)
    assert set(rep["ranks"].values()) == {16, 32}  # min(2n, out, in)
    rep = peftlab.apply(tiny_net("llama"), "fourierft").report()  # n = 1000 is capped at 16 x 32 on v_proj
    assert rep["trainable_params"] == layers * (1000 + 512)
    pm = peftlab.apply(tiny_net("bert"), "fourierft[n_frequency=2,targets=query]")
    randomize_adapter(pm)
    for _, name, d in pm.placements["default"]:
        assert d.rank() == 4
        assert torch.linalg.matrix_rank(d.delta_out_in().detach()) <= 4


# -- 4. files: PEFT's FOURIERFT, both ways ---------------------------------------------------------------
@pytest.mark.parametrize("kind,config", [
    ("bert", "fourierft[n_frequency=200,scaling=100]"),
    ("llama", "fourierft[n_frequency=700,targets=all-linear]"),  # k_proj, v_proj (512 entries) are capped
    ("gpt2", "fourierft[n_frequency=64,seed=3,targets=c_attn|mlp.c_proj]"),
])
def test_peftlab_file_loads_in_peft(kind, config, tmp_path):
    batch = tiny_batch(tiny_net(kind), batch=2, seq=6)
    assert_same_and_adapted(ours_in_peft(lambda: tiny_net(kind), config, batch, tmp_path))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "FOURIERFT"
    if kind == "llama":
        assert raw["n_frequency_pattern"] == {rf"layers\.{i}\.self_attn\.{p}_proj": 512 for i in (0, 1) for p in "kv"}


@pytest.mark.parametrize("kind,kw", [
    ("bert", dict(n_frequency=200, target_modules=["query", "value"])),
    ("llama", dict(n_frequency=300, scaling=50.0, random_loc_seed=5, target_modules=["q_proj", "v_proj", "up_proj"])),
    ("gpt2", dict(n_frequency=64, target_modules=["c_attn"], init_weights=True)),
])
def test_peft_file_loads_in_peftlab(kind, kw, tmp_path):
    batch = tiny_batch(tiny_net(kind), batch=2, seq=6)
    assert_same_and_adapted(peft_in_ours(lambda: tiny_net(kind), peft.FourierFTConfig(**kw), batch, tmp_path))


def test_gaussian_init_is_not_the_identity():
    base = tiny_net("bert")
    batch = tiny_batch(base, batch=2, seq=6)
    torch.manual_seed(0)
    pm = peftlab.apply(tiny_net("bert"), "fourierft[init=gaussian,n_frequency=50]")
    d = pm.placements["default"][0][2]
    assert d.fourierft_spectrum.std() > 0.5
    with torch.no_grad():
        assert (pm(**batch).last_hidden_state - base(**batch).last_hidden_state).abs().max() > 1e-3


def test_config_errors():
    for bad, field in (("n_frequency=0", "n_frequency"), ("init=ones", "init"), ("scaling=0", "scaling")):
        with pytest.raises(peftlab.ConfigError, match=f"FourierFTConfig.{field}="):
            peftlab.parse_method_string(f"fourierft[{bad}]")
