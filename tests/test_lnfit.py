"""LNFit (LayerNorm tuning): what is specific to it. Identity at init, save/load, merge, mixed
batches and training are the registry-driven checks of test_engine.py.

Only the norms' affine parameters train, as deltas: y = (γ0 + Δγ) ⊙ n(x) + β0 + Δβ. Files are
PEFT's LN_TUNING format (the tuned values under ``<norm>.ln_tuning_layers.<weight|bias>``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftlab
from conftest import randomize_adapter, tiny_net
from peft_both_ways import assert_same_and_adapted, ours_in_peft, peft_in_ours
from peftlab.methods.selective.lnfit import NormDelta, is_norm
from peftlab.zoo import tiny_batch

pytestmark = pytest.mark.filterwarnings("ignore")


def delta_at(pm, name: str) -> NormDelta:
    return next(d for _, n, d in pm.placements["default"] if n == name)


def tuned(pm, name: str, p: str) -> torch.Tensor:
    d = delta_at(pm, name)
    return getattr(d, f"{p}0") + d.delta_of(p).detach()


# -- 1. math ----------------------------------------------------------------------------------------
def test_layernorm_rmsnorm_t5norm_match_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    bert = tiny_net("bert")
    pm = peftlab.apply(bert, "lnfit")
    randomize_adapter(pm, std=0.3)
    ln, name = bert.encoder.layer[1].output.LayerNorm, "encoder.layer.1.output.LayerNorm"
    n = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    expected = tuned(pm, name, "weight") * n + tuned(pm, name, "bias")
    torch.testing.assert_close(ln(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ln(x), ln.weight * n + ln.bias, atol=1e-3)

    for kind, name, eps_attr in (("llama", "model.layers.0.input_layernorm", "variance_epsilon"),
                                 ("t5", "encoder.block.0.layer.0.layer_norm", "variance_epsilon")):
        model = tiny_net(kind)
        pm = peftlab.apply(model, "lnfit")
        randomize_adapter(pm, std=0.3)
        norm = model.get_submodule(name)
        rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + getattr(norm, eps_attr))
        torch.testing.assert_close(norm(x), tuned(pm, name, "weight") * rms, atol=1e-5, rtol=1e-5)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: y = (1 + γ) ⊙ x / rms(x), γ = 0 at init (a term free of γ)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_norm_with_a_term_free_of_gamma():
    model = nn.Sequential(nn.Linear(8, 8), OffsetRMSNorm(8))
    pm = peftlab.apply(model, "lnfit")
    d = delta_at(pm, "1")
    assert d.offset and not delta_at(peftlab.apply(nn.Sequential(nn.LayerNorm(8)), "lnfit"), "0").offset
    randomize_adapter(pm, std=0.3)
    x = torch.randn(3, 8)
    h = model[0](x)
    expected = (1 + d.weight0 + d.delta_of("weight").detach()) * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), expected, atol=1e-6, rtol=1e-5)
        pm.merge()
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_which_layers_are_norms():
    class T5LayerNorm(nn.Module):  # weight-only affine of the last dim, recognised by its class name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    yes = [nn.LayerNorm(4), nn.RMSNorm(4), T5LayerNorm(), tiny_net("llama").model.norm]
    no = [nn.LayerNorm(4, elementwise_affine=False), nn.BatchNorm1d(4), nn.GroupNorm(2, 4), nn.Linear(4, 4),
          nn.LayerNorm((2, 4))]
    assert all(is_norm(m) for m in yes) and not any(is_norm(m) for m in no)
    with pytest.raises(peftlab.NotApplicableError, match="lnfit cannot be applied to Sequential: it needs LayerNorm"):
        peftlab.apply(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "lnfit")


# -- 3. counts --------------------------------------------------------------------------------------
def test_counts_match_formula():
    d, layers = 32, 2
    rep = peftlab.apply(tiny_net("bert"), "lnfit").report()
    n_bert = (1 + 2 * layers) * 2 * d  # embeddings LN + two LNs per layer, γ and β each
    assert rep["trainable_params"] == rep["changed_params"] == n_bert == 320 and rep["ranks"] == {}
    rep = peftlab.apply(tiny_net("llama"), "lnfit").report()
    assert rep["trainable_params"] == rep["changed_params"] == (2 * layers + 1) * d  # RMSNorm: γ only
    rep = peftlab.apply(tiny_net("t5"), "lnfit").report()
    # encoder: 2 per block + final; decoder: 3 per block + final; γ only
    assert rep["trainable_params"] == (2 * layers + 1 + 3 * layers + 1) * d


# -- 4. files: PEFT's LN_TUNING, both ways -------------------------------------------------------------
def test_file_holds_the_tuned_norms_in_peft_keys(tmp_path):
    model = tiny_net("bert")
    pm = peftlab.apply(model, "lnfit")
    randomize_adapter(pm, std=0.3)
    pm.merge()  # saving while merged writes the same tuned values
    pm.save(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert set(tensors) == {f"base_model.model.{n}.ln_tuning_layers.{p}" for n in norms for p in ("weight", "bias")}
    for n in norms:
        torch.testing.assert_close(tensors[f"base_model.model.{n}.ln_tuning_layers.weight"], model.get_submodule(n).weight)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LN_TUNING" and raw["target_modules"] == sorted(norms)


@pytest.mark.parametrize("kind", ["bert", "llama", "t5"])
def test_peftlab_file_loads_in_peft(kind, tmp_path):
    batch = tiny_batch(tiny_net(kind), batch=2, seq=6)
    assert_same_and_adapted(ours_in_peft(lambda: tiny_net(kind), "lnfit[exclude=re:.*embeddings.*]", batch, tmp_path))


@pytest.mark.parametrize("kind,targets", [("bert", ["LayerNorm"]), ("llama", None), ("t5", None)])
def test_peft_file_loads_in_peftlab(kind, targets, tmp_path):
    import peft

    batch = tiny_batch(tiny_net(kind), batch=2, seq=6)
    out = peft_in_ours(lambda: tiny_net(kind), peft.LNTuningConfig(target_modules=targets), batch, tmp_path)
    assert_same_and_adapted(out)
