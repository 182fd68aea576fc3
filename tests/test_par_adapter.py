"""Parallel / scaled parallel adapter: h ← sublayer(x) + s · (W_up σ(W_down x + b_down) + b_up), against
the formula on the whole sublayer of each architecture (BERT's tap + dense pair included), the
placement table, counts against the formula, the scale, and mixed batches through the pair.

Identity at init, save/load, merge refusal, gradient isolation and training on a tiny teacher are
checked for every architecture by tests/test_engine.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transformers

import peftlab
from conftest import assert_gathered_mixed_batch, main_output, randomize_adapter, tiny_net
from peftlab.methods.additive.par_adapter import InputTap, ParAdapterConfig, ParallelAdapter, parallel_adapter

out = main_output
#: ViT's layout: whole ``attention`` / ``mlp`` modules in transformers 5, BERT's layout (pairs) before.
VIT5 = int(transformers.__version__.split(".")[0]) >= 5
VIT_PREFIX = "layers" if VIT5 else "encoder.layer"


def delta_at(pm, name, adapter="default"):
    return next(d for _, n, d in pm.placements[adapter] if n == name)


def branch(d: ParallelAdapter, x: torch.Tensor, act=F.relu) -> torch.Tensor:
    """W_up σ(W_down x + b_down) + b_up, written out."""
    return act(x @ d.adapter_down.weight.T + d.adapter_down.bias) @ d.adapter_up.weight.T + d.adapter_up.bias


def first(y):
    return y[0] if isinstance(y, tuple) else y


# -- 1. math --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,site,module", [
    ("llama", "ffn", "model.layers.1.mlp"),
    ("llama", "attn", "model.layers.0.self_attn"),
    ("gpt2", "ffn", "transformer.h.0.mlp"),
    *([("vit", "attn", "layers.1.attention")] if VIT5 else []),
    ("t5", "ffn", "decoder.block.1.layer.2.DenseReluDense"),
])
def test_whole_sublayer_matches_formula(kind, site, module):
    """The hooked sublayer returns sublayer(x) + s·branch(x), x its own input."""
    model = tiny_net(kind)
    pm = peftlab.apply(model, f"par_adapter[site={site},scale=2.5,r=6]")
    randomize_adapter(pm)
    d = delta_at(pm, module)
    sub = model.get_submodule(module)
    x = torch.randn(2, 5, 32)
    kwargs = {}
    if kind == "llama" and site == "attn":
        kwargs = {"position_embeddings": model.model.rotary_emb(x, torch.arange(5)[None]), "attention_mask": None}
    if kind == "vit":
        kwargs = {"attention_mask": None}
    with torch.no_grad():
        with pm.disable_adapters():
            y = first(sub(x, **kwargs))
        got = first(sub(x, **kwargs))
    torch.testing.assert_close(got, y + 2.5 * branch(d, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parallel_adapter(x, y, *d.weights(), F.relu, 2.5), got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("site", ["ffn", "attn"])
def test_bert_pair_adds_before_residual_and_layernorm(site):
    """BERT: LN(dense(h) + b + s·branch(x) + x), x the sublayer input (the tap's)."""
    model = tiny_net("bert")
    pm = peftlab.apply(model, f"par_adapter[site={site},activation=gelu]")
    randomize_adapter(pm, std=0.3)
    layer = model.encoder.layer[1]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        if site == "ffn":
            d = delta_at(pm, "encoder.layer.1.output.dense")
            with pm.disable_adapters():
                inner = layer.intermediate(x)
            got = layer.output(layer.intermediate(x), x)
            proj, norm = layer.output.dense, layer.output.LayerNorm
        else:
            d = delta_at(pm, "encoder.layer.1.attention.output.dense")
            with pm.disable_adapters():
                inner = layer.attention.self(x, None)[0]
            got = layer.attention(x, None)[0]
            proj, norm = layer.attention.output.dense, layer.attention.output.LayerNorm
        with pm.disable_adapters():
            expected = norm(proj(inner) + 4.0 * branch(d, x, F.gelu) + x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert isinstance(delta_at(pm, "encoder.layer.1." + ("intermediate" if site == "ffn" else "attention")), InputTap)


def test_scale_multiplies_the_branch():
    model = tiny_net("gpt2")
    pm = peftlab.apply(model, "par_adapter[scale=1]", adapter_name="one")
    pm.add_adapter("four", "par_adapter")
    randomize_adapter(pm, "one")
    pm.adapter_modules["four"].load_state_dict(pm.adapter_modules["one"].state_dict())
    with pm.disable_adapters():
        base = out(pm)
    pm.set_adapter("one")
    one = out(pm) - base
    sub = model.transformer.h[0].mlp
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        pm.set_adapter("one")
        d1 = sub(x)
        pm.set_adapter("four")
        d4 = sub(x)
        with pm.disable_adapters():
            y = sub(x)
    torch.testing.assert_close(d4 - y, 4 * (d1 - y), atol=1e-5, rtol=1e-5)
    assert one.abs().max() > 1e-4


def test_explicit_linear_target_is_a_parallel_adapter_beside_it():
    model = tiny_net("llama")
    pm = peftlab.apply(model, "par_adapter[targets=up_proj,r=3,scale=1]")
    randomize_adapter(pm)
    d = delta_at(pm, "model.layers.0.mlp.up_proj")
    assert d.adapter_down.weight.shape == (3, 32) and d.adapter_up.weight.shape == (64, 3)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight) + branch(d, x), atol=1e-5, rtol=1e-5)


# -- placement ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,site,per_block", [
    ("bert", "ffn", {"intermediate": "InputTap", "output.dense": "ParallelAdapter"}),
    ("bert", "attn", {"attention": "InputTap", "attention.output.dense": "ParallelAdapter"}),
    ("llama", "ffn", {"mlp": "ParallelAdapter"}),
    ("llama", "attn", {"self_attn": "ParallelAdapter"}),
    ("gpt2", "ffn", {"mlp": "ParallelAdapter"}),
    ("gpt2", "attn", {"attn": "ParallelAdapter"}),
    ("vit", "ffn", {"mlp": "ParallelAdapter"} if VIT5 else {"intermediate": "InputTap", "output.dense": "ParallelAdapter"}),
    ("vit", "attn", {"attention": "ParallelAdapter"} if VIT5 else
     {"attention": "InputTap", "attention.output.dense": "ParallelAdapter"}),
])
def test_placement_per_architecture(kind, site, per_block):
    pm = peftlab.apply(tiny_net(kind), f"par_adapter[site={site}]")
    prefix = {"bert": "encoder.layer", "llama": "model.layers", "gpt2": "transformer.h", "vit": VIT_PREFIX}[kind]
    expected = {f"{prefix}.{i}.{s}": c for i in (0, 1) for s, c in per_block.items()}
    assert {n: type(d).__name__ for _, n, d in pm.placements["default"]} == expected


def test_only_the_outermost_match_is_adapted():
    """A module inside another selected sublayer gets no second adapter (ViT 4.x's attention.attention)."""
    pm = peftlab.apply(tiny_net("llama"), "par_adapter[targets=mlp|down_proj]")
    assert [n for _, n, _ in pm.placements["default"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_t5_placement():
    ffn = [n for _, n, _ in peftlab.apply(tiny_net("t5"), "par_adapter").placements["default"]]
    assert len(ffn) == 4 and all(n.endswith(".DenseReluDense") for n in ffn)
    attn = [n for _, n, _ in peftlab.apply(tiny_net("t5"), "par_adapter[site=attn]").placements["default"]]
    assert sum(n.endswith(".SelfAttention") for n in attn) == 4 and sum(n.endswith(".EncDecAttention") for n in attn) == 2


# -- 3. counts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,site,modules", [("bert", "ffn", 2), ("bert", "attn", 2), ("llama", "ffn", 2),
                                               ("gpt2", "attn", 2), ("t5", "ffn", 4), ("t5", "attn", 6)])
@pytest.mark.parametrize("size,m", [("", 2), (",r=5", 5)])
def test_counts_match_formula(kind, site, modules, size, m):
    d = 32
    pm = peftlab.apply(tiny_net(kind), f"par_adapter[site={site}{size}]")
    rep = pm.report()
    assert rep["trainable_params"] == rep["changed_params"] == modules * (d * m + m + m * d + d)
    assert rep["ranks"] == {}
    assert sum(isinstance(dl, ParallelAdapter) for _, _, dl in pm.placements["default"]) == modules


# -- mixed batches and files -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mixed_batch_through_the_pair_is_gathered(kind, monkeypatch):
    assert_gathered_mixed_batch(monkeypatch, ParallelAdapter, tiny_net(kind), "par_adapter",
                                ParAdapterConfig(r=3, scale=1.5, activation="silu"), names=["a", "b", None, "a"],
                                batch={"input_ids": torch.randint(3, 128, (4, 7))})


def test_files_use_adapter_down_up_keys(tmp_path):
    pm = peftlab.apply(tiny_net("bert"), "par_adapter")
    keys = sorted(pm.adapter_tensors())
    assert keys == sorted(f"base_model.model.encoder.layer.{i}.output.dense.{p}.{w}"
                          for i in (0, 1) for p in ("adapter_down", "adapter_up") for w in ("weight", "bias"))


def test_dense_projection_without_its_tap_is_an_error():
    model = tiny_net("bert")
    peftlab.apply(model, "par_adapter")
    with pytest.raises(RuntimeError, match="sublayer's input was not seen"):
        model.encoder.layer[0].output(torch.randn(1, 2, 64), torch.randn(1, 2, 32))


def test_config_errors():
    cfg = peftlab.parse_method_string("par_adapter[site=attn,scale=2,r=16]")
    assert isinstance(cfg, ParAdapterConfig) and (cfg.site, cfg.scale, cfg.r) == ("attn", 2, 16)
    assert peftlab.parse_method_string(cfg.to_string()) == cfg
    with pytest.raises(peftlab.ConfigError, match="site"):
        ParAdapterConfig(site="output")
    with pytest.raises(peftlab.ConfigError, match="scale"):
        ParAdapterConfig(scale=0)
