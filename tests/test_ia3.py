"""(IA)³: the five criteria of METHODS.md on tiny random models, and Hugging Face PEFT interop.

Output site (keys/values): y ← l ⊙ y; input site (the FFN's second projection): x ← l ⊙ x.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import assert_mixed_batch_equals_per_adapter, spy_on_routed, main_output, randomize_adapter, tiny_net
from peftlab.core import io
from peftlab.methods.additive.ia3 import IA3Config, IA3Delta

import peft  # noqa: E402  (a dev dependency: installed by make test from the lock)

pytestmark = pytest.mark.filterwarnings("ignore")


MODELS = {
    "bert": lambda: tiny_net("bert", noisy_biases=True),
    "llama": lambda: tiny_net("llama"),
    "gpt2": lambda: tiny_net("gpt2", noisy_biases=True),
}
bert, llama, gpt2 = MODELS["bert"], MODELS["llama"], MODELS["gpt2"]
out = main_output


def randomize(pm, adapter="default", seed=0, std=0.3):
    randomize_adapter(pm, adapter, std=std, seed=seed)


def delta_at(pm, name, adapter="default") -> IA3Delta:
    return next(d for _, n, d in pm.placements[adapter] if n == name)


def sites(pm, adapter="default") -> dict[str, str]:
    return {n: d.site for _, n, d in pm.placements[adapter]}


# -- 1. math ----------------------------------------------------------------------------------------
def test_bert_output_and_input_sites_match_formula():
    model = bert()
    pm = peftlab.apply(model, "ia3")
    randomize(pm)
    key = model.encoder.layer[0].attention.self.key
    l_k = delta_at(pm, "encoder.layer.0.attention.self.key").ia3_l  # (out,)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(key(x), l_k.view(-1) * (x @ key.weight.T + key.bias), atol=1e-6, rtol=1e-5)
    ffn = model.encoder.layer[1].output.dense
    l_ff = delta_at(pm, "encoder.layer.1.output.dense").ia3_l  # (in,)
    h = torch.randn(2, 5, 64)
    torch.testing.assert_close(ffn(h), (l_ff.view(-1) * h) @ ffn.weight.T + ffn.bias, atol=1e-6, rtol=1e-5)


def test_llama_and_gpt2_conv1d_match_formula():
    model = llama()
    pm = peftlab.apply(model, "ia3")
    randomize(pm)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x, h = torch.randn(2, 4, 32), torch.randn(2, 4, 64)
    l_v = delta_at(pm, "model.layers.0.self_attn.v_proj").ia3_l
    assert l_v.shape == (16,)  # 2 key/value heads of 8
    torch.testing.assert_close(attn.v_proj(x), l_v.view(-1) * (x @ attn.v_proj.weight.T), atol=1e-6, rtol=1e-5)
    l_ff = delta_at(pm, "model.layers.0.mlp.down_proj").ia3_l
    torch.testing.assert_close(mlp.down_proj(h), (l_ff.view(-1) * h) @ mlp.down_proj.weight.T, atol=1e-6, rtol=1e-5)

    g = gpt2()
    pm = peftlab.apply(g, "ia3")
    randomize(pm)
    c_attn, c_proj = g.transformer.h[1].attn.c_attn, g.transformer.h[1].mlp.c_proj  # Conv1D: weight (in, out)
    l_qkv = delta_at(pm, "transformer.h.1.attn.c_attn").ia3_l
    l_ff = delta_at(pm, "transformer.h.1.mlp.c_proj").ia3_l
    inner = g.config.n_inner
    assert l_qkv.shape == (96,) and l_ff.shape == (inner,)
    torch.testing.assert_close(c_attn(x), l_qkv.view(-1) * (x @ c_attn.weight + c_attn.bias), atol=1e-6, rtol=1e-5)
    h = torch.randn(2, 4, inner)
    torch.testing.assert_close(c_proj(h), (l_ff.view(-1) * h) @ c_proj.weight + c_proj.bias, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,expected", [
    ("bert", {"attention.self.key": "output", "attention.self.value": "output", "output.dense": "input"}),
    ("llama", {"self_attn.k_proj": "output", "self_attn.v_proj": "output", "mlp.down_proj": "input"}),
    ("gpt2", {"attn.c_attn": "output", "mlp.c_proj": "input"}),
])
def test_default_targets_and_sites(kind, expected):
    pm = peftlab.apply(MODELS[kind](), "ia3")
    got = sites(pm)
    assert len(got) == 2 * len(expected)
    for name, site in got.items():
        matched = [k for k in expected if name.endswith("." + k)]
        assert matched, name
        assert site == expected[max(matched, key=len)], (name, site)
    # BERT's attention output projection is not a feed-forward module (it is not targeted at all).
    assert not any(n.endswith("attention.output.dense") for n in got)


def test_t5_default_targets():
    got = sites(peftlab.apply(tiny_net("t5"), "ia3"))
    assert sum(n.endswith(".DenseReluDense.wo") and s == "input" for n, s in got.items()) == 4
    assert sum(n.endswith((".k", ".v")) and s == "output" for n, s in got.items()) == 12  # enc 2x2, dec 2x4


# -- 2. identity at init ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_identity_at_init(kind):
    model = MODELS[kind]()
    base = out(model)
    pm = peftlab.apply(model, "ia3")
    assert all(torch.equal(p, torch.ones_like(p)) for p in pm.adapter_modules["default"].parameters())
    groups = peftlab.param_groups(pm, weight_decay=0.1)
    assert all(g["weight_decay"] == 0 for g in groups)  # scaling vectors are not decayed toward 0
    assert torch.equal(out(pm), base)


# -- 3. counts --------------------------------------------------------------------------------------
def test_counts_match_formula():
    d, ff, layers = 32, 64, 2
    rep = peftlab.apply(bert(), "ia3").report()
    assert rep["trainable_params"] == layers * (d + d + ff)  # l_k, l_v, l_ff
    assert rep["changed_params"] == layers * (2 * (d * d + d) + d * ff)  # k, v rows + biases; W_2 columns only
    assert set(rep["ranks"].values()) == {32} and len(rep["ranks"]) == 3 * layers

    kv = 2 * 8  # Llama: 2 key/value heads of dimension 8
    rep = peftlab.apply(llama(), "ia3").report()
    assert rep["trainable_params"] == layers * (kv + kv + ff)
    assert rep["changed_params"] == layers * (2 * kv * d + d * ff)  # no biases
    assert rep["ranks"]["model.layers.0.self_attn.k_proj"] == kv and rep["ranks"]["model.layers.1.mlp.down_proj"] == d

    g = gpt2()
    inner = g.config.n_inner  # GPT-2's feed-forward width
    rep = peftlab.apply(g, "ia3").report()
    assert rep["trainable_params"] == layers * (3 * d + inner)
    assert rep["changed_params"] == layers * (3 * d * d + 3 * d + inner * d)


# -- 4. files, merge, unload --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_save_load_merge_unmerge_unload(kind, tmp_path):
    model = MODELS[kind]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftlab.apply(model, "ia3")
    randomize(pm)
    expected = out(pm)
    pm.save(tmp_path)
    loaded = peftlab.load(MODELS[kind](), tmp_path)
    torch.testing.assert_close(out(loaded), expected, atol=1e-6, rtol=0)

    pm.merge()
    changed = [k for k in before if not torch.equal(model.state_dict()[k], before[k])]
    assert changed and all(k.endswith((".weight", ".bias")) for k in changed)
    torch.testing.assert_close(out(pm), expected, atol=1e-5, rtol=1e-5)
    pm.unmerge()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(out(pm), expected, atol=1e-6, rtol=0)
    pm.unmerge()  # nothing merged: no-op

    unloaded = loaded.unload()
    assert all(torch.equal(unloaded.state_dict()[k], before[k]) for k in before)

    merged = peftlab.load(MODELS[kind](), tmp_path).merge_and_unload()
    torch.testing.assert_close(out(merged), expected, atol=1e-5, rtol=1e-5)


def test_feedforward_merge_leaves_bias_alone():
    model = bert()
    layer = model.encoder.layer[0]
    b_ff, b_k = layer.output.dense.bias.clone(), layer.attention.self.key.bias.clone()
    pm = peftlab.apply(model, "ia3")
    randomize(pm)
    l_k = delta_at(pm, "encoder.layer.0.attention.self.key").ia3_l.detach()
    pm.merge()
    assert torch.equal(layer.output.dense.bias, b_ff)  # input site: columns of W only
    torch.testing.assert_close(layer.attention.self.key.bias, l_k * b_k, atol=1e-6, rtol=1e-6)  # output site: l ⊙ b


def test_two_adapters_stack_and_merge():
    model = llama()
    pm = peftlab.apply(model, "ia3", adapter_name="a")
    pm.add_adapter("b", IA3Config(targets=["v_proj", "down_proj"]))
    randomize(pm, "a", seed=1)
    randomize(pm, "b", seed=2)
    pm.set_adapter(["a", "b"])
    both = out(pm)
    pm.merge()
    torch.testing.assert_close(out(pm), both, atol=1e-5, rtol=1e-5)
    pm.unmerge()
    torch.testing.assert_close(out(pm), both, atol=1e-6, rtol=0)


# -- PEFT interop ---------------------------------------------------------------------------------------
PEFT_VARIANTS = {
    "bert": [dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]), {}],
    "llama": [dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), {}],
    "gpt2": [dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True), {}],
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("variant", [0, 1], ids=["explicit", "peft_defaults"])
def test_peft_file_loads_in_peftlab(kind, variant, tmp_path):
    model = peft.get_peft_model(MODELS[kind](), peft.IA3Config(**PEFT_VARIANTS[kind][variant]))
    randomize_peft(model)
    expected = out(model)
    model.save_pretrained(tmp_path)
    pm = peftlab.load(MODELS[kind](), tmp_path)
    assert (out(pm) - expected).abs().max().item() <= 1e-5
    theirs = {n: p for n, p in model.named_parameters() if "ia3_l" in n}
    assert sum(p.numel() for p in theirs.values()) == pm.report()["trainable_params"]


def randomize_peft(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "ia3_l" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("spec", ["ia3", "explicit", "layers"])
def test_peftlab_file_loads_in_peft(kind, spec, tmp_path):
    if spec == "ia3":
        cfg = "ia3"
    else:
        kw = dict(PEFT_VARIANTS[kind][0])
        cfg = IA3Config(targets=kw["target_modules"], feedforward=kw["feedforward_modules"],
                        layers=[1] if spec == "layers" else None)  # PEFT's IA3 has no layers: a regex
    pm = peftlab.apply(MODELS[kind](), cfg)
    randomize(pm)
    expected = out(pm)
    pm.save(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "IA3" and raw["init_ia3_weights"] is True
    if "placed" in inspect.signature(io.config_file_dict).parameters:  # core passes the placement
        assert raw["fan_in_fan_out"] is (kind == "gpt2")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for _, name, d in pm.placements["default"]:
        key = f"base_model.model.{name}.ia3_l"
        assert tensors[key].shape == ((1, d.n_in) if d.site == "input" else (d.n_out, 1))
    theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path)
    assert (out(theirs) - expected).abs().max().item() <= 1e-5
    n_theirs = sum(p.numel() for n, p in theirs.named_parameters() if "ia3_l" in n)
    assert n_theirs == pm.report()["trainable_params"]


def test_classifier_head_round_trips_with_peft(tmp_path):
    def bert_cls():
        return tiny_net("bert", task="classification")

    pm = peftlab.apply(bert_cls(), "ia3", modules_to_save=["classifier"])
    randomize(pm)
    expected = out(pm)
    pm.save(tmp_path)
    theirs = peft.PeftModel.from_pretrained(bert_cls(), tmp_path)
    assert (out(theirs) - expected).abs().max().item() <= 1e-5
    torch.testing.assert_close(out(peftlab.load(bert_cls(), tmp_path)), expected, atol=1e-6, rtol=0)


def test_peft_bert_feedforward_quirk_is_reproduced(tmp_path):
    """PEFT's feed-forward list ``output.dense`` also matches ``attention.output.dense`` (its ``endswith``
    rule): read back, that module is scaled at its input as well, exactly as in PEFT."""
    model = peft.get_peft_model(bert(), peft.IA3Config(
        target_modules=["key", "output.dense"], feedforward_modules=["output.dense"]))
    model.save_pretrained(tmp_path)
    pm = peftlab.load(bert(), tmp_path)
    assert sites(pm)["encoder.layer.0.attention.output.dense"] == "input"


# -- mixed batches ------------------------------------------------------------------------------------
def test_mixed_batch_equals_per_adapter(monkeypatch):
    calls = spy_on_routed(monkeypatch, IA3Delta)
    pm = peftlab.apply(llama(), "ia3", adapter_name="a")
    pm.add_adapter("b", "ia3[targets=k_proj|v_proj|down_proj|up_proj,feedforward=down_proj]")
    randomize(pm, "a", seed=1)
    randomize(pm, "b", seed=2)
    names = ["b", None, "a"]
    assert_mixed_batch_equals_per_adapter(pm, names)
    assert calls and all(calls)  # output and input sites both took the gathered path


# -- config -------------------------------------------------------------------------------------------
def test_config_strings_and_errors():
    cfg = peftlab.parse_method_string("ia3[targets=k_proj|v_proj|down_proj,feedforward=down_proj]")
    assert isinstance(cfg, IA3Config) and cfg.feedforward == ["down_proj"]
    assert peftlab.parse_method_string(cfg.to_string()) == cfg
    assert IA3Config.from_dict(json.loads(cfg.to_json())) == cfg
    assert sites(peftlab.apply(llama(), cfg))["model.layers.0.mlp.down_proj"] == "input"
    with pytest.raises(peftlab.ConfigError, match="feed_forward"):
        peftlab.parse_method_string("ia3[feed_forward=down_proj]")
    with pytest.raises(peftlab.TargetError, match="dwn_proj"):
        peftlab.apply(llama(), "ia3[targets=k_proj|down_proj,feedforward=dwn_proj]")
    with pytest.raises(peftlab.TargetError, match="k_prj"):
        peftlab.apply(llama(), "ia3[targets=k_prj]")
