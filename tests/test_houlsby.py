"""Houlsby sequential adapter: the five criteria of METHODS.md on tiny random models.

y ← y + W_up σ(W_down y + b_down) + b_up after the attention output and FFN output projections.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftlab
from conftest import assert_gathered_mixed_batch, main_output, randomize_adapter, tiny_net
from peftlab.core.targeting import layer_index
from peftlab.methods.additive.houlsby import HoulsbyAdapter, HoulsbyConfig

pytestmark = pytest.mark.filterwarnings("ignore")


KINDS = ["bert", "llama", "gpt2"]
out = main_output


def randomize(pm, adapter="default", seed=0, std=0.2):
    randomize_adapter(pm, adapter, std=std, seed=seed)


def delta_at(pm, name, adapter="default") -> HoulsbyAdapter:
    return next(d for _, n, d in pm.placements[adapter] if n == name)


# -- 1. math ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_bert_module_matches_formula(activation):
    model = tiny_net("bert")
    pm = peftlab.apply(model, HoulsbyConfig(reduction_factor=4, activation=activation))
    randomize(pm)
    layer = model.encoder.layer[0].attention.output.dense
    d = delta_at(pm, "encoder.layer.0.attention.output.dense")
    assert d.r == 8
    x = torch.randn(2, 5, 32)
    h = x @ layer.weight.T + layer.bias
    act = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu}[activation]
    expected = h + act(h @ d.adapter_down.weight.T + d.adapter_down.bias) @ d.adapter_up.weight.T + d.adapter_up.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_matches_formula():
    model = tiny_net("gpt2")
    pm = peftlab.apply(model, "houlsby[r=3]")
    randomize(pm)
    layer = model.transformer.h[1].mlp.c_proj  # Conv1D: weight is (in, out)
    d = delta_at(pm, "transformer.h.1.mlp.c_proj")
    x = torch.randn(2, 4, model.config.n_inner)
    h = x @ layer.weight + layer.bias
    expected = h + torch.relu(h @ d.adapter_down.weight.T + d.adapter_down.bias) @ d.adapter_up.weight.T + d.adapter_up.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,per_block", [
    ("bert", {"attention.output.dense", "output.dense"}),
    ("vit", {"attention.o_proj", "mlp.fc2"}),
    ("llama", {"self_attn.o_proj", "mlp.down_proj"}),
    ("gpt2", {"attn.c_proj", "mlp.c_proj"}),
])
def test_default_targets_two_adapters_per_block(kind, per_block):
    model = tiny_net(kind)
    pm = peftlab.apply(model, "houlsby")
    names = [n for _, n, _ in pm.placements["default"]]
    blocks: dict[int, set[str]] = {}
    for n in names:
        i = layer_index(n)
        suffix = n.split(f".{i}.", 1)[1]
        blocks.setdefault(i, set()).add(suffix)
    assert sorted(blocks) == [0, 1]
    assert all(b == per_block for b in blocks.values()), blocks
    assert len(names) == 4


def test_t5_default_targets():
    pm = peftlab.apply(tiny_net("t5"), "houlsby")
    names = [n for _, n, _ in pm.placements["default"]]
    enc = [n for n in names if n.startswith("encoder.")]
    dec = [n for n in names if n.startswith("decoder.")]
    assert len(enc) == 4 and len(dec) == 6  # encoder: self-attn + FFN; decoder: + cross-attention
    assert all(n.endswith((".SelfAttention.o", ".EncDecAttention.o", ".DenseReluDense.wo")) for n in names)


# -- 3. counts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_counts_match_formula(kind):
    d, layers = 32, 2
    pm = peftlab.apply(tiny_net(kind), "houlsby")  # reduction_factor 16 -> m = 2
    m = d // 16
    per_adapter = d * m + m + m * d + d  # W_down, b_down, W_up, b_up
    rep = pm.report()
    assert rep["trainable_params"] == rep["changed_params"] == 2 * layers * per_adapter
    assert rep["ranks"] == {}  # nonlinear: no ΔW
    assert rep["modules"] == 2 * layers
    pm2 = peftlab.apply(tiny_net(kind), HoulsbyConfig(r=5))
    assert pm2.report()["trainable_params"] == 2 * layers * (d * 5 + 5 + 5 * d + d)


# -- 4. files (merge refusal, unload: tests/test_engine.py) --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_same_outputs(kind, tmp_path):
    pm = peftlab.apply(tiny_net(kind), "houlsby[reduction_factor=4]")
    randomize(pm)
    expected = out(pm)
    pm.save(tmp_path)
    keys = set(pm.adapter_tensors())
    assert all(k.startswith("base_model.model.") and k.split(".")[-2] in ("adapter_down", "adapter_up") for k in keys)
    assert len(keys) == 4 * 4
    loaded = peftlab.load(tiny_net(kind), tmp_path)
    assert loaded.configs["default"] == pm.configs["default"]
    torch.testing.assert_close(out(loaded), expected, atol=1e-6, rtol=0)


# -- mixed batches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("activation_b", ["relu", "silu"])
def test_mixed_batch_equals_per_adapter(kind, activation_b, monkeypatch):
    """Gathered bmm (bottlenecks 8 and 3, zero-padded), also when the activations differ (each row
    takes its own σ of the shared pre-activation)."""
    assert_gathered_mixed_batch(monkeypatch, HoulsbyAdapter, tiny_net(kind), "houlsby[reduction_factor=4]",
                                HoulsbyConfig(r=3, activation=activation_b), std=0.2)


# -- config -------------------------------------------------------------------------------------------
def test_config_strings_and_errors():
    cfg = peftlab.parse_method_string("houlsby[reduction_factor=4,activation=gelu]")
    assert isinstance(cfg, HoulsbyConfig) and cfg.reduction_factor == 4 and cfg.activation == "gelu"
    assert peftlab.parse_method_string(cfg.to_string()) == cfg
    assert HoulsbyConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(peftlab.ConfigError, match="reduction"):
        peftlab.parse_method_string("houlsby[reduction=4]")
    with pytest.raises(peftlab.ConfigError, match="activation"):
        HoulsbyConfig(activation="tanh")
    with pytest.raises(peftlab.ConfigError, match="reduction_factor"):
        HoulsbyConfig(reduction_factor=0)
    with pytest.raises(peftlab.TargetError, match="nope"):
        peftlab.apply(tiny_net("bert"), "houlsby[targets=nope]")
