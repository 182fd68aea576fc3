"""Pfeiffer sequential adapter: houlsby's adapter after the FFN only. Math against the formula, one
adapter per block on the FFN output of every architecture, counts, files, and one gathered call for a
mixed batch of pfeiffer and houlsby adapters (the same delta class).

Identity at init, save/load, merge refusal, gradient isolation and training on a tiny teacher are
checked for every architecture by tests/test_engine.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transformers

import peftlab
from conftest import assert_gathered_mixed_batch, randomize_adapter, tiny_net
from peftlab.core.targeting import layer_index
from peftlab.methods.additive.houlsby import HoulsbyAdapter
from peftlab.methods.additive.pfeiffer import PfeifferConfig


def test_module_matches_formula():
    model = tiny_net("llama")
    pm = peftlab.apply(model, PfeifferConfig(r=5, activation="gelu"))
    randomize_adapter(pm, std=0.2)
    layer = model.model.layers[1].mlp.down_proj
    d = next(d for _, n, d in pm.placements["default"] if n == "model.layers.1.mlp.down_proj")
    x = torch.randn(2, 4, 64)
    h = x @ layer.weight.T
    expected = h + F.gelu(h @ d.adapter_down.weight.T + d.adapter_down.bias) @ d.adapter_up.weight.T + d.adapter_up.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,ffn_out,blocks", [
    ("bert", "output.dense", 2), ("llama", "mlp.down_proj", 2), ("gpt2", "mlp.c_proj", 2),
    ("vit", "mlp.fc2" if int(transformers.__version__.split(".")[0]) >= 5 else "output.dense", 2),
    ("t5", "DenseReluDense.wo", 4),
])
def test_one_adapter_per_block_after_the_ffn(kind, ffn_out, blocks):
    pm = peftlab.apply(tiny_net(kind), "pfeiffer")
    names = [n for _, n, _ in pm.placements["default"]]
    assert len(names) == blocks and all(n.endswith("." + ffn_out) for n in names)
    assert "attention" not in " ".join(names) and len({(n.split(".")[0], layer_index(n)) for n in names}) == blocks
    houlsby = {n for _, n, _ in peftlab.apply(tiny_net(kind), "houlsby").placements["default"]}
    assert set(names) < houlsby


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_counts_match_formula(kind):
    d, layers = 32, 2
    rep = peftlab.apply(tiny_net(kind), "pfeiffer").report()  # reduction_factor 16 -> m = 2
    m = 2
    assert rep["trainable_params"] == rep["changed_params"] == layers * (d * m + m + m * d + d)
    assert rep["ranks"] == {} and rep["modules"] == layers
    rep = peftlab.apply(tiny_net(kind), "pfeiffer[reduction_factor=4]").report()
    assert rep["trainable_params"] == layers * (d * 8 + 8 + 8 * d + d)


def test_file_keys():
    pm = peftlab.apply(tiny_net("bert"), "pfeiffer")
    assert sorted(pm.adapter_tensors()) == sorted(
        f"base_model.model.encoder.layer.{i}.output.dense.adapter_{p}.{w}"
        for i in (0, 1) for p in ("down", "up") for w in ("weight", "bias"))


def test_mixed_batch_with_houlsby_is_one_gathered_call(monkeypatch):
    assert_gathered_mixed_batch(monkeypatch, HoulsbyAdapter, tiny_net("gpt2"), "pfeiffer",
                                "houlsby[r=3,activation=silu]", std=0.2)


def test_config():
    cfg = peftlab.parse_method_string("pfeiffer[r=4,activation=silu]")
    assert isinstance(cfg, PfeifferConfig) and cfg.method == "pfeiffer" and (cfg.r, cfg.activation) == (4, "silu")
    assert peftlab.parse_method_string(cfg.to_string()) == cfg
    with pytest.raises(peftlab.ConfigError, match="PfeifferConfig.r=0"):
        PfeifferConfig(r=0)
