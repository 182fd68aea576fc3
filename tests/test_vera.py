"""VeRA: what is specific to it. Identity at init, save/load, merge, mixed batches and training are
the registry-driven checks of test_engine.py.

h = W0 x + Λ_b B Λ_d A x with A, B frozen, random, one pair per adapter shared by its layers (sized
to the largest layer, sliced); b, d train.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import assert_mixed_batch_equals_per_adapter, randomize_adapter, spy_on_routed, tiny_net
from peft_both_ways import assert_same_and_adapted, ours_in_peft, outputs, peft_in_ours
from peftlab.methods.reparam.vera import VeraLinear, projections
from peftlab.zoo import tiny_batch

pytestmark = pytest.mark.filterwarnings("ignore")


def delta_at(pm, name: str, adapter: str = "default") -> VeraLinear:
    return next(d for _, n, d in pm.placements[adapter] if n == name)


# -- 1. math ----------------------------------------------------------------------------------------
def test_forward_and_merge_match_explicit_matrices():
    model = tiny_net("llama")
    pm = peftlab.apply(model, "vera[r=6,targets=v_proj|down_proj]")
    randomize_adapter(pm, std=0.3)
    name = "model.layers.1.self_attn.v_proj"  # 32 -> 16; down_proj is 64 -> 32: the pair is (6 x 64), (32 x 6)
    d, v = delta_at(pm, name), model.get_submodule(name)
    A, B = d.projections.vera_A, d.projections.vera_B
    assert A.shape == (6, 64) and B.shape == (32, 6)
    assert all(x.projections is d.projections for _, _, x in pm.placements["default"])  # one pair per adapter
    dW = torch.diag(d.vera_lambda_b) @ B[:16, :] @ torch.diag(d.vera_lambda_d) @ A[:, :32]
    x, w0 = torch.randn(3, 5, 32), v.weight.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(v(x), x @ (w0 + dW).T, atol=1e-5, rtol=1e-5)
        pm.merge()
        torch.testing.assert_close(v.weight, w0 + dW, atol=1e-6, rtol=1e-5)


def test_pair_is_peft_draw_from_the_key():
    """A, B are PEFT's: a CPU generator seeded with the key draws A (r x in) then B (out x r), each
    uniform in ±sqrt(6 / fan_in)."""
    gen = torch.Generator().manual_seed(3)
    bound_a, bound_b = (6 / 64) ** 0.5, (6 / 5) ** 0.5
    A_ref = torch.empty(5, 64).uniform_(-bound_a, bound_a, generator=gen)
    B_ref = torch.empty(32, 5).uniform_(-bound_b, bound_b, generator=gen)
    A, B = projections(5, 64, 32, key=3)
    assert torch.equal(A, A_ref) and torch.equal(B, B_ref)
    theirs = peft.get_peft_model(tiny_net("llama"), peft.VeraConfig(r=5, target_modules=["v_proj", "down_proj"],
                                                                    projection_prng_key=3))
    assert torch.equal(theirs.base_model.vera_A["default"], A) and torch.equal(theirs.base_model.vera_B["default"], B)


# -- 3. counts --------------------------------------------------------------------------------------
def test_counts_match_formula():
    r, layers = 4, 2
    rep = peftlab.apply(tiny_net("llama"), f"vera[r={r}]").report()  # q_proj 32 -> 32, v_proj 32 -> 16
    assert rep["trainable_params"] == layers * ((32 + r) + (16 + r)) == 112
    assert rep["changed_params"] == layers * (32 * 32 + 16 * 32)
    assert set(rep["ranks"].values()) == {r} and len(rep["ranks"]) == 2 * layers
    assert peftlab.apply(tiny_net("llama"), "vera[r=40]").report()["ranks"]["model.layers.0.self_attn.v_proj"] == 16
    pm = peftlab.apply(tiny_net("llama"), f"vera[r={r}]")
    randomize_adapter(pm)
    name = "model.layers.0.self_attn.q_proj"
    assert torch.linalg.matrix_rank(delta_at(pm, name).delta_params(pm.model.get_submodule(name))["weight"]) == r


# -- 4. files: PEFT's VERA, both ways, with and without the saved pair ---------------------------------
@pytest.mark.parametrize("save", [True, False])
def test_file_keys(save, tmp_path):
    pm = peftlab.apply(tiny_net("bert"), f"vera[r=4,save_projection={str(save).lower()}]")
    pm.save(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    names = [n for _, n, _ in pm.placements["default"]]
    per_layer = {f"base_model.model.{n}.vera_lambda_{v}" for n in names for v in "bd"}
    assert keys == per_layer | ({"base_model.vera_A", "base_model.vera_B"} if save else set())
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "VERA" and raw["save_projection"] is save and raw["projection_prng_key"] == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("save", [True, False])
def test_peftlab_file_loads_in_peft(kind, save, tmp_path):
    batch = tiny_batch(tiny_net(kind), batch=2, seq=6)
    config = f"vera[r=8,key=5,save_projection={str(save).lower()},targets=all-linear]"
    assert_same_and_adapted(ours_in_peft(lambda: tiny_net(kind), config, batch, tmp_path))


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "mlp.c_proj"])])
@pytest.mark.parametrize("save", [True, False])
def test_peft_file_loads_in_peftlab(kind, targets, save, tmp_path):
    batch = tiny_batch(tiny_net(kind), batch=2, seq=6)
    cfg = peft.VeraConfig(r=8, target_modules=targets, save_projection=save, projection_prng_key=11)
    assert_same_and_adapted(peft_in_ours(lambda: tiny_net(kind), cfg, batch, tmp_path))


def test_pair_is_read_from_the_file_when_saved(tmp_path):
    """A file's saved pair wins over the key (a pair that the key would not regenerate still loads)."""
    model = tiny_net("bert")
    batch = tiny_batch(model, batch=2, seq=6)
    pm = peftlab.apply(model, "vera[r=4]")
    randomize_adapter(pm)
    with torch.no_grad():
        delta_at(pm, "encoder.layer.0.attention.self.query").projections.vera_A.mul_(2)
    expected = outputs(pm, batch)
    pm.save(tmp_path)
    assert (outputs(peftlab.load(tiny_net("bert"), tmp_path), batch) - expected).abs().max().item() <= 1e-6


# -- several adapters ----------------------------------------------------------------------------------
def test_mixed_batch_of_adapters_with_different_pairs_is_gathered(monkeypatch):
    pm = peftlab.apply(tiny_net("llama"), "vera[r=4]", adapter_name="a")
    pm.add_adapter("b", "vera[r=8,key=1,targets=q_proj|v_proj|o_proj]")
    randomize_adapter(pm, "a", seed=1)
    randomize_adapter(pm, "b", seed=2)
    calls = spy_on_routed(monkeypatch, VeraLinear)
    assert_mixed_batch_equals_per_adapter(pm, ["b", None, "a"])
    assert calls and all(calls)


def test_union_keeps_each_parts_pair_apart(tmp_path):
    model = tiny_net("bert")
    batch = tiny_batch(model, batch=2, seq=6)
    pm = peftlab.apply(model, "vera[r=4,targets=query]+vera[r=6,key=2,targets=value]")
    randomize_adapter(pm)
    expected = outputs(pm, batch)
    pm.save(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"parts.0.base_model.vera_A", "parts.1.base_model.vera_A"} <= keys
    assert (outputs(peftlab.load(tiny_net("bert"), tmp_path), batch) - expected).abs().max().item() <= 1e-6


def test_config_errors():
    for bad, field in (("r=0", "r"), ("dropout=1.5", "dropout"), ("key=x", "key")):
        with pytest.raises(peftlab.ConfigError, match=f"VeraConfig.{field}="):
            peftlab.parse_method_string(f"vera[{bad}]")
