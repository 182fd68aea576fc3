"""freeze_layers: what is specific to it. Identity at init, save/load, merge, mixed batches and
training are the registry-driven checks of test_engine.py.

Every parameter of the chosen blocks trains, as a trainable copy P' beside the snapshot P0 (ΔP = P' − P0):
the adapted model must compute what the base computes with those blocks' parameters set to P'.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftlab
from conftest import randomize_adapter, tiny_net
from peft_both_ways import outputs
from peftlab.methods.selective.freeze_layers import FreezeLayersConfig, block_stacks
from peftlab.zoo import tiny_batch

pytestmark = pytest.mark.filterwarnings("ignore")


def tuned_state(pm, adapter="default") -> dict[str, torch.Tensor]:
    """{base parameter name: P'} of an adapter."""
    return {f"{n}.{p}": getattr(d, f"tuned_{p}").detach() for _, n, d in pm.placements[adapter] for p in d.tuned}


def fully_tuned(make, state: dict[str, torch.Tensor]) -> nn.Module:
    """The naive formula: a fresh base with the chosen blocks' parameters replaced by P'."""
    model = make()
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return model


# -- 1. math ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,config", [
    ("bert", "freeze_layers"), ("gpt2", "freeze_layers[top=2]"), ("llama", "freeze_layers[blocks=layers.0]"),
    ("t5", "freeze_layers[blocks=encoder.block.0]"),  # block 0 holds T5's relative-attention Embedding
])
def test_adapted_model_is_the_base_with_the_blocks_replaced(kind, config):
    model = tiny_net(kind)
    batch = tiny_batch(model, batch=2, seq=6)
    pm = peftlab.apply(model, config)
    randomize_adapter(pm, std=0.1)
    expected = outputs(fully_tuned(lambda: tiny_net(kind), tuned_state(pm)), batch)
    assert (outputs(pm, batch) - expected).abs().max().item() <= 1e-5
    assert (outputs(tiny_net(kind), batch) - expected).abs().max().item() > 1e-3


def test_linear_conv1d_embedding_deltas_match_formula():
    x = torch.randn(2, 3, 32)
    g = tiny_net("gpt2")
    pm = peftlab.apply(g, "freeze_layers")
    randomize_adapter(pm, std=0.1)
    st = tuned_state(pm)
    c_attn = g.transformer.h[1].attn.c_attn  # Conv1D: weight (in, out)
    torch.testing.assert_close(c_attn(x), x @ st["transformer.h.1.attn.c_attn.weight"] + st["transformer.h.1.attn.c_attn.bias"],
                               atol=1e-5, rtol=1e-5)
    t5 = tiny_net("t5")
    pm = peftlab.apply(t5, "freeze_layers[blocks=decoder.block.0]")
    randomize_adapter(pm, std=0.1)
    name = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    ids = torch.randint(0, 8, (4, 5))
    torch.testing.assert_close(t5.get_submodule(name)(ids), tuned_state(pm)[f"{name}.weight"][ids])


def test_adapters_coexist_and_merge_writes_the_copies():
    model = tiny_net("bert")
    batch = tiny_batch(model, batch=2, seq=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftlab.apply(model, "freeze_layers", adapter_name="top")
    pm.add_adapter("first", "freeze_layers[blocks=encoder.layer.0,exclude=LayerNorm]")
    randomize_adapter(pm, "top", seed=1)
    randomize_adapter(pm, "first", seed=2)
    for name in ("top", "first"):
        pm.set_adapter(name)
        expected = outputs(fully_tuned(lambda: tiny_net("bert"), tuned_state(pm, name)), batch)
        assert (outputs(pm, batch) - expected).abs().max().item() <= 1e-5
    pm.merge()
    for k, v in tuned_state(pm, "first").items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    untouched = [k for k in before if k.startswith("embeddings.")]
    assert untouched and all(torch.equal(model.state_dict()[k], before[k]) for k in untouched)
    pm.unmerge()
    assert all(torch.allclose(model.state_dict()[k], before[k], atol=1e-6) for k in before)


# -- 3. counts --------------------------------------------------------------------------------------
def test_counts_match_formula():
    d, ff = 32, 64
    linear = lambda i, o: i * o + o  # noqa: E731
    bert_block = 4 * linear(d, d) + linear(d, ff) + linear(ff, d) + 2 * 2 * d  # q k v o, FFN, two LayerNorms
    model = tiny_net("bert")
    rep = peftlab.apply(model, "freeze_layers").report()
    assert bert_block == sum(p.numel() for p in model.encoder.layer[1].parameters()) == 8544
    assert rep["trainable_params"] == rep["changed_params"] == bert_block
    assert rep["ranks"] == {f"encoder.layer.1.{m}": d for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")}
    rep = peftlab.apply(tiny_net("bert"), "freeze_layers[top=1,exclude=LayerNorm]").report()
    assert rep["trainable_params"] == bert_block - 4 * d
    t5 = tiny_net("t5")
    rep = peftlab.apply(t5, "freeze_layers").report()  # the top block of the encoder and of the decoder
    assert rep["trainable_params"] == sum(p.numel() for b in (t5.encoder.block[1], t5.decoder.block[1]) for p in b.parameters())


# -- 4. files: the tuned tensors under the base's own names ----------------------------------------------
def test_file_is_a_partial_state_dict_of_the_blocks(tmp_path):
    model = tiny_net("llama")
    batch = tiny_batch(model, batch=2, seq=6)
    pm = peftlab.apply(model, "freeze_layers")
    randomize_adapter(pm, std=0.1)
    expected = outputs(pm, batch)
    pm.save(tmp_path)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert set(state) == {f"model.layers.1.{n}" for n, _ in model.model.layers[1].named_parameters()}
    assert (outputs(fully_tuned(lambda: tiny_net("llama"), state), batch) - expected).abs().max().item() <= 1e-5
    loaded = peftlab.load(tiny_net("llama"), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(tuned_state(loaded).values(), tuned_state(pm).values()))


# -- what it applies to, and config errors ------------------------------------------------------------------
class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.g * x


def test_blocks_requirement_and_errors():
    assert list(block_stacks(tiny_net("t5"))) == ["encoder.block", "decoder.block"]
    with pytest.raises(peftlab.NotApplicableError, match="freeze_layers cannot be applied to Sequential: it needs numbered blocks"):
        peftlab.apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "freeze_layers")
    stack = nn.Module()
    stack.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), Scale()) for _ in range(2))
    with pytest.raises(peftlab.TargetError, match="'layers.1.1' is a Scale"):
        peftlab.apply(stack, "freeze_layers")
    assert len(peftlab.apply(copy.deepcopy(stack), "freeze_layers[exclude=layers.1.1]").placements["default"]) == 1
    with pytest.raises(peftlab.TargetError, match="top=3 but encoder.layer has 2 blocks"):
        peftlab.apply(tiny_net("bert"), "freeze_layers[top=3]")
    with pytest.raises(peftlab.TargetError, match="block 'layers.7' matches no block.*encoder.layer.0"):
        peftlab.apply(tiny_net("bert"), "freeze_layers[blocks=layers.7]")
    for bad, field in (("top=0", "top"), ("top=1,blocks=layer.0", "top"), ("targets=query", "targets"), ("layers=1", "layers")):
        with pytest.raises(peftlab.ConfigError, match=f"FreezeLayersConfig.{field}="):
            peftlab.parse_method_string(f"freeze_layers[{bad}]")
    cfg = peftlab.parse_method_string("freeze_layers[blocks=encoder.layer.0|re:.*layer\\.1]")
    assert cfg == FreezeLayersConfig(blocks=["encoder.layer.0", "re:.*layer\\.1"])
    assert {n.split(".")[2] for _, n, _ in peftlab.apply(tiny_net("bert"), cfg).placements["default"]} == {"0", "1"}
