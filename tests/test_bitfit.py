"""BitFit: the five criteria of METHODS.md on tiny random models.

Only biases are trained, as a delta Δb over each existing bias: y = W x + b0 + Δb (LayerNorm: γ ⊙ norm(x)
+ β0 + Δβ). The base is never modified; files hold the tuned biases b0 + Δb under the base's own names.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import peftlab
from conftest import add_noise_to_biases, assert_mixed_batch_equals_per_adapter, spy_on_routed, main_output, randomize_adapter, tiny_net
from peftlab.core import io
from peftlab.methods.selective.bitfit import BiasDelta, BitFitConfig

pytestmark = pytest.mark.filterwarnings("ignore")


MODELS = {"bert": lambda: tiny_net("bert", noisy_biases=True), "gpt2": lambda: tiny_net("gpt2", noisy_biases=True)}
bert, gpt2 = MODELS["bert"], MODELS["gpt2"]


def bert_cls():
    return tiny_net("bert", task="classification", noisy_biases=True)


def llama():
    return tiny_net("llama")


class ConvNet(nn.Module):
    """A plain module: Conv2d (bias per channel, dim 1), BatchNorm2d, GroupNorm, Linear without bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 2, bias=False)
        add_noise_to_biases(self).eval()

    def forward(self, x):
        return self.head(self.gn(self.bn(self.conv(x))).mean((2, 3)))


out = main_output


def randomize(pm, adapter="default", seed=0, std=0.3):
    randomize_adapter(pm, adapter, std=std, seed=seed)


def delta_at(pm, name, adapter="default") -> BiasDelta:
    return next(d for _, n, d in pm.placements[adapter] if n == name)


def bias_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if n.endswith(".bias")]


# -- 1. math ----------------------------------------------------------------------------------------
def test_linear_layernorm_conv1d_match_formula():
    model = bert()
    pm = peftlab.apply(model, "bitfit")
    randomize(pm)
    q, ln = model.encoder.layer[0].attention.self.query, model.encoder.layer[1].output.LayerNorm
    dq = delta_at(pm, "encoder.layer.0.attention.self.query").delta_bias
    dln = delta_at(pm, "encoder.layer.1.output.LayerNorm").delta_bias
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(q(x), x @ q.weight.T + q.bias + dq, atol=1e-6, rtol=1e-5)
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    torch.testing.assert_close(ln(x), ln.weight * normed + ln.bias + dln, atol=1e-5, rtol=1e-5)

    g = gpt2()
    pm = peftlab.apply(g, "bitfit")
    randomize(pm)
    c_attn = g.transformer.h[0].attn.c_attn  # Conv1D: weight (in, out)
    d = delta_at(pm, "transformer.h.0.attn.c_attn").delta_bias
    torch.testing.assert_close(c_attn(x), x @ c_attn.weight + c_attn.bias + d, atol=1e-6, rtol=1e-5)


def test_conv_and_norms_per_channel():
    model = ConvNet()
    pm = peftlab.apply(model, "bitfit")
    assert [n for _, n, _ in pm.placements["default"]] == ["conv", "bn", "gn"]  # head has no bias
    randomize(pm)
    x = torch.randn(2, 3, 5, 5)
    dc = delta_at(pm, "conv").delta_bias
    expected = F.conv2d(x, model.conv.weight, model.conv.bias + dc, padding=1)
    torch.testing.assert_close(model.conv(x), expected, atol=1e-5, rtol=1e-5)
    model.eval()
    dg = delta_at(pm, "gn").delta_bias
    torch.testing.assert_close(model.gn(x[:, :2].repeat(1, 2, 1, 1)),
                               F.group_norm(x[:, :2].repeat(1, 2, 1, 1), 2, model.gn.weight, model.gn.bias + dg, 1e-5))
    pm.merge()
    merged = model(x)
    pm.unmerge()
    torch.testing.assert_close(pm(x), merged, atol=1e-5, rtol=1e-5)


def test_default_targets_every_bias():
    model = bert_cls()
    pm = peftlab.apply(model, "bitfit")
    placed = {f"{n}.bias" for _, n, _ in pm.placements["default"]}
    assert placed == set(bias_names(model))  # every bias, LayerNorms and the head included


def test_model_without_biases_is_a_clear_error():
    with pytest.raises(peftlab.TargetError, match=r"bitfit cannot be applied to LlamaForCausalLM: it needs layers with a bias"):
        peftlab.apply(llama(), "bitfit")


# -- 3. counts --------------------------------------------------------------------------------------
def test_counts_match_formula():
    d, ff, layers = 32, 64, 2
    # embeddings LayerNorm; per layer q, k, v, attention out, its LayerNorm, intermediate, output, its LayerNorm; pooler
    n = d + layers * (4 * d + d + ff + d + d) + d
    model = bert()
    rep = peftlab.apply(model, "bitfit").report()
    assert n == sum(model.get_parameter(b).numel() for b in bias_names(model)) == 640
    assert rep["trainable_params"] == rep["changed_params"] == n
    assert rep["ranks"] == {}
    rep = peftlab.apply(bert(), "bitfit[targets=query|value]").report()
    assert rep["trainable_params"] == rep["changed_params"] == 2 * layers * d


# -- 4. files, merge, unload --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_file_is_a_partial_state_dict_of_tuned_biases(kind, tmp_path):
    model = MODELS[kind]()
    pm = peftlab.apply(model, "bitfit")
    randomize(pm)
    expected = out(pm)
    pm.save(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    state = {k.removeprefix(io.PREFIX): v for k, v in tensors.items()}
    assert set(state) == set(bias_names(model))  # only the biases, under the base's own names
    for _, name, d in pm.placements["default"]:
        torch.testing.assert_close(state[f"{name}.bias"], model.get_submodule(name).bias + d.delta_bias.detach())

    fresh = MODELS[kind]()
    result = fresh.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(out(fresh), expected, atol=1e-5, rtol=1e-5)

    loaded = peftlab.load(MODELS[kind](), tmp_path)
    torch.testing.assert_close(out(loaded), expected, atol=1e-6, rtol=0)
    for _, name, d in loaded.placements["default"]:
        torch.testing.assert_close(d.delta_bias, delta_at(pm, name).delta_bias, atol=1e-7, rtol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_merge_unmerge_unload(kind, tmp_path):
    model = MODELS[kind]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftlab.apply(model, "bitfit")
    randomize(pm)
    expected = out(pm)
    pm.save(tmp_path / "unmerged")
    pm.merge()
    changed = {k for k in before if not torch.equal(model.state_dict()[k], before[k])}
    assert changed == set(bias_names(model)) | ({"lm_head.bias"} & set(before))
    torch.testing.assert_close(out(pm), expected, atol=1e-5, rtol=1e-5)
    pm.save(tmp_path / "merged")  # saving while merged writes the same tuned biases
    a = load_file(tmp_path / "unmerged" / "adapter_model.safetensors")
    b = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pm.unmerge()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(out(pm), expected, atol=1e-6, rtol=0)

    pm2 = peftlab.load(MODELS[kind](), tmp_path / "unmerged")
    base = pm2.unload()
    assert all(torch.equal(base.state_dict()[k], before[k]) for k in before)  # bit-identical
    merged = peftlab.load(MODELS[kind](), tmp_path / "unmerged").merge_and_unload()
    torch.testing.assert_close(out(merged), expected, atol=1e-5, rtol=1e-5)


# -- several adapters, mixed batches ---------------------------------------------------------------------
def test_adapters_coexist_and_mixed_batch_is_gathered(monkeypatch):
    model = bert()
    pm = peftlab.apply(model, "bitfit", adapter_name="a")
    pm.add_adapter("b", BitFitConfig(targets=["query", "value", "LayerNorm"]))
    randomize(pm, "a", seed=1)
    randomize(pm, "b", seed=2)
    pm.set_adapter(["a", "b"])  # both active: deltas sum
    q = model.encoder.layer[0].attention.self.query
    x = torch.randn(2, 3, 32)
    da, db = delta_at(pm, "encoder.layer.0.attention.self.query", "a"), delta_at(pm, "encoder.layer.0.attention.self.query", "b")
    torch.testing.assert_close(q(x), x @ q.weight.T + q.bias + da.delta_bias + db.delta_bias, atol=1e-6, rtol=1e-5)

    calls = spy_on_routed(monkeypatch, BiasDelta)
    names = ["a", None, "b"]
    assert_mixed_batch_equals_per_adapter(pm, names)
    assert calls and all(calls)  # every routed bias delta took the gathered path


# -- config -------------------------------------------------------------------------------------------
def test_config_strings_and_errors():
    cfg = peftlab.parse_method_string("bitfit[targets=query|value,layers=1]")
    assert isinstance(cfg, BitFitConfig) and cfg.targets == ["query", "value"] and cfg.layers == [1]
    assert peftlab.parse_method_string(cfg.to_string()) == cfg
    assert BitFitConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert len(peftlab.apply(bert(), cfg).placements["default"]) == 2
    with pytest.raises(peftlab.ConfigError, match="target"):
        peftlab.parse_method_string("bitfit[target=query]")
    with pytest.raises(peftlab.TargetError, match="word_embeddings"):
        peftlab.apply(bert(), "bitfit[targets=word_embeddings]")  # has no bias
