"""Hybrid methods (issue 9): ``mam`` and ``unipelt`` as unions of their parts, and the gates they use.

What is specific here (the registry-driven checks of tests/test_engine.py cover identity, unload,
save/load, merge refusal, mixed batches and the tiny teacher on every architecture):
- ``mam[...]`` places exactly what ``prefix[...]+par_adapter[site=ffn,...]`` places: equal outputs,
  equal tensors under equal keys, equal ``adapter_config.json``; only our own config differs;
- gates: values against G = mean_t σ(W_g x_t + b_g) on captured inputs (LoRA, adapter, prefix);
  gradients reach every W_g; closing a gate (b_g = −∞) removes exactly its part's change (LoRA,
  adapter) or leaves exactly a zero prefix (the prefix: documented in prefix_gate.py);
- counts: trainable = Σ of the parts' own counts + the gates, by formula on tiny Llama;
- save/load of UniPELT and of each gated part; PEFT never gets a gated file;
- gated LoRA / adapters batch per row through their own gathered path; a gated prefix refuses;
- both hybrids learn a tiny teacher, every part (gates included) moving.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.gate import GatedDelta, gate_value
from peftlab.methods.additive.prefix_gate import GatedPrefixDelta
from peftlab.zoo import tiny_batch, tiny_model

from conftest import IDS, assert_gathered_mixed_batch, first_output, main_output, one_thread, randomize_adapter

_threads = pytest.fixture(autouse=True)(one_thread)


def _apply(kind: str, method: str, seed: int = 0):
    torch.manual_seed(seed)  # the same init (the prefix's "tokens" draw, Kaiming, gates) for both sides
    return peftlab.apply(tiny_model(kind), method)


def _deltas(pm, cls, inner=None):
    return [d for _, _, d in pm.placements["default"]
            if isinstance(d, cls) and (inner is None or type(d.inner).__name__ == inner)]


# -- MAM = its union ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_mam_places_exactly_its_union(kind, tmp_path):
    mam = _apply(kind, "mam[length=5,r=4,scale=2]")
    union = _apply(kind, "prefix[length=5]+par_adapter[site=ffn,r=4,scale=2]")
    assert [(p, m, type(d)) for p, m, d in mam.placements["default"]] == \
           [(p, m, type(d)) for p, m, d in union.placements["default"]]
    for pm in (mam, union):
        randomize_adapter(pm, std=0.2, seed=4)
    batch = tiny_batch(mam.model, batch=3, seq=8)
    out_mam, out_union = (first_output(pm(**batch)).detach() for pm in (mam, union))
    assert torch.equal(out_mam, out_union)
    mam.save(tmp_path / "mam")
    union.save(tmp_path / "union")
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("mam", "union"))
    assert sorted(a) == sorted(b) and any(k.startswith("parts.1.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "mam/adapter_config.json").read_bytes() == (tmp_path / "union/adapter_config.json").read_bytes()
    own = json.loads((tmp_path / "mam/peftlab_config.json").read_text())["peftlab"]
    assert own["method"] == "mam" and own["length"] == 5
    loaded = peftlab.load(tiny_model(kind), tmp_path / "mam")
    assert type(loaded.configs["default"]).__name__ == "MamConfig"
    assert torch.equal(first_output(loaded(**batch)).detach(), out_mam)


def test_mam_defaults_and_options_pass_to_the_parts():
    cfg = peftlab.parse_method_string("mam")
    assert cfg.union().to_string() == "prefix[length=30]+par_adapter[reduction_factor=2]"  # site=ffn, scale=4: defaults
    prefix, adapter = peftlab.parse_method_string("mam[length=7,r=3,scale=2,activation=gelu,init=zero]").parts()
    assert (prefix.length, prefix.init, adapter.r, adapter.scale, adapter.activation, adapter.site) == \
           (7, "zero", 3, 2.0, "gelu", "ffn")
    assert peftlab.parse_method_string("mam[reduction_factor=4]").parts()[1].bottleneck(1024) == 256
    parts = peftlab.parse_method_string("unipelt[r=4,alpha=8,length=6,adapter_r=5]").parts()
    assert [p.method for p in parts] == ["lora", "prefix", "pfeiffer"] and all(p.gate for p in parts)
    assert (parts[0].r, parts[0].alpha, parts[1].length, parts[2].r) == (4, 8, 6, 5)


@pytest.mark.parametrize("spec,match", [
    ("mam[scale=0]", "MamConfig.*scale"),
    ("unipelt[length=0]", "UnipeltConfig.*length"),
    ("mam[targets=q_proj]", "targets"),
    ("lora[gate=2]", "gate"),
    ("dylora[gate=true]", "gate"),
])
def test_config_errors_name_the_field(spec, match):
    with pytest.raises(ConfigError, match=match):
        peftlab.parse_method_string(spec)


@pytest.mark.parametrize("kind,spec,match", [
    ("llama", "lora[gate=true,targets=embed_tokens]", "Linear or Conv1D"),
    ("t5", "prefix[gate=true,encoder=true]", "encoder=true"),
])
def test_gates_refuse_what_they_cannot_gate(kind, spec, match):
    with pytest.raises(ConfigError, match=match):
        peftlab.apply(tiny_model(kind), spec)


# -- gate values against the formula --------------------------------------------------------------------
def _capture(module, store: dict, key: str, what: str):
    def hook(mod, args, output):
        store[key] = (args[0] if what == "input" else output).detach().clone()
    return module.register_forward_hook(hook)


def test_lora_and_adapter_gates_follow_the_formula():
    """At q_proj: y = W x + G(x)·s·B A x with G = mean_t σ(W_g x_t + b_g); at down_proj (pfeiffer):
    y = h + G(z)·branch(h), z the projection's input, h its base output."""
    pm = _apply("llama", "unipelt[length=3]")
    randomize_adapter(pm, std=0.3, seed=1)
    model = pm.model
    seen: dict = {}
    q = model.model.layers[1].self_attn.q_proj
    down = model.model.layers[0].mlp.down_proj
    hooks = [_capture(q, seen, "qx", "input"), _capture(q, seen, "qy", "output"),
             _capture(down, seen, "dx", "input"), _capture(down, seen, "dy", "output")]
    main_output(pm)
    for h in hooks:
        h.remove()
    gl = dict((m, d) for _, m, d in pm.placements["default"])
    lora, adapter = gl["model.layers.1.self_attn.q_proj"], gl["model.layers.0.mlp.down_proj"]
    x = seen["qx"]
    g = torch.sigmoid(x @ lora.gate.weight.T + lora.gate.bias).mean(1)  # (batch, 1), written out
    assert torch.allclose(g, gate_value(x, lora.gate.weight, lora.gate.bias))
    s = lora.inner.scaling
    expected = F.linear(x, q.weight) + g[:, None] * s * (x @ lora.inner.lora_A.weight.T @ lora.inner.lora_B.weight.T)
    torch.testing.assert_close(seen["qy"], expected, atol=1e-6, rtol=0)
    z = seen["dx"]
    h = F.linear(z, down.weight)
    a = adapter.inner
    branch = F.relu(h @ a.adapter_down.weight.T + a.adapter_down.bias) @ a.adapter_up.weight.T + a.adapter_up.bias
    gz = torch.sigmoid(z @ adapter.gate.weight.T + adapter.gate.bias).mean(1)
    torch.testing.assert_close(seen["dy"], h + gz[:, None] * branch, atol=1e-6, rtol=0)
    assert 0.05 < g.min() and g.max() < 0.95  # a real gate, neither open nor closed


def test_prefix_gate_scales_each_layers_keys_and_values_by_the_formula():
    """One row: the gated prefix equals the plain prefix whose P_k^l, P_v^l are multiplied by
    (G_k^l, G_v^l) = mean_t σ(W_g^l v_t + b_g^l), v_t = the layer's v_proj output."""
    gated = _apply("llama", "prefix[gate=true,length=4]")
    randomize_adapter(gated, std=0.5, seed=2)
    model = gated.model
    seen: dict = {}
    hooks = [_capture(layer.self_attn.v_proj, seen, l, "output") for l, layer in enumerate(model.model.layers)]
    ids = IDS[:1]
    out = main_output(gated, ids)
    for h in hooks:
        h.remove()
    (delta,) = _deltas(gated, GatedPrefixDelta)
    L, width = len(model.model.layers), delta.token_dim
    P = delta.prompt_embeddings.detach().view(4, 2 * L, width).clone()
    for l, gate in enumerate(delta.gates):
        g = torch.sigmoid(seen[l] @ gate.weight.T + gate.bias).mean(1)[0]  # (2,): key gate, value gate
        assert 0.01 < g.min() and g.max() < 0.99
        P[:, 2 * l] *= g[0]
        P[:, 2 * l + 1] *= g[1]
    plain = peftlab.apply(tiny_model("llama"), "prefix[length=4]")
    with torch.no_grad():
        next(iter(plain.adapter_modules["default"].values())).prompt_embeddings.copy_(P.view(4, -1))
    torch.testing.assert_close(main_output(plain, ids), out, atol=1e-5, rtol=0)
    with torch.no_grad():  # and the gates matter: the unscaled P gives another output
        next(iter(plain.adapter_modules["default"].values())).prompt_embeddings.copy_(delta.prompt_embeddings)
    assert (main_output(plain, ids) - out).abs().max() > 1e-3


# -- gates train, and close -------------------------------------------------------------------------------
def test_gradients_reach_every_gate():
    pm = _apply("llama", "unipelt[length=3]")
    randomize_adapter(pm, std=0.3, seed=3)  # B ≠ 0 and W_up ≠ 0: at init their gates get no gradient
    pm.train()
    first_output(pm(input_ids=IDS)).pow(2).mean().backward()
    gates = [d.gate for d in _deltas(pm, GatedDelta)] + list(_deltas(pm, GatedPrefixDelta)[0].gates)
    assert len(gates) == 4 + 2 + 2
    for gate in gates:
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        assert gate.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_closing_a_gate_removes_exactly_its_part(kind):
    """b_g = −∞ gives G = 0: closing LoRA's and the adapter's gates leaves exactly the gated prefix
    alone (the same tensors in a ``prefix[gate=true]`` adapter); closing the prefix's gates leaves
    exactly the adapter with P = 0 (zero key/value rows that still take softmax mass)."""
    pm = _apply(kind, "unipelt[length=3]")
    randomize_adapter(pm, std=0.3, seed=5)
    batch = tiny_batch(pm.model, batch=3, seq=8)

    def out():
        with torch.no_grad():
            return first_output(pm(**batch))

    full = out()
    (prefix,) = _deltas(pm, GatedPrefixDelta)
    parts = {"lora": [d.gate.bias for d in _deltas(pm, GatedDelta, "LoraLinear")],
             "adapter": [d.gate.bias for d in _deltas(pm, GatedDelta, "HoulsbyAdapter")],
             "prefix": [g.bias for g in prefix.gates]}
    with torch.no_grad():
        for biases in (parts["lora"], parts["adapter"]):
            for b in biases:
                b.fill_(-float("inf"))
    alone = peftlab.apply(tiny_model(kind), "prefix[gate=true,length=3]")
    _deltas(alone, GatedPrefixDelta)[0].load_file_state(prefix.file_state())
    with torch.no_grad():
        assert torch.equal(out(), first_output(alone(**batch)))
        assert not torch.allclose(out(), full)
    # Reopen them (as randomized), close the prefix's gates instead.
    pm2 = _apply(kind, "unipelt[length=3]")
    randomize_adapter(pm2, std=0.3, seed=5)
    pm = pm2
    (prefix,) = _deltas(pm, GatedPrefixDelta)
    with torch.no_grad():
        assert torch.equal(out(), full)
        for g in prefix.gates:
            g.bias.fill_(-float("inf"))
        closed = out()
        for g in prefix.gates:
            g.bias.zero_()
        prefix.prompt_embeddings.zero_()
        assert torch.equal(closed, out())


# -- counts -------------------------------------------------------------------------------------------------
def test_counts_are_the_parts_plus_the_gates():
    """Tiny Llama (d = 32, FFN 64, 2 layers, 2 KV heads of 8): trainable = Σ of lora[r=8], prefix
    [length=10] and pfeiffer's own counts + the gates: (d+1) per q/v projection, (64+1) per FFN
    output projection, 2·(16+1) per layer for the prefix."""
    report = _apply("llama", "unipelt").report()
    own = {m: _apply("llama", m).report()["trainable_params"] for m in ("lora[r=8,alpha=16]", "prefix[length=10]", "pfeiffer")}
    L, d, ffn, kv = 2, 32, 64, 16
    assert own == {"lora[r=8,alpha=16]": L * (8 * d + d * 8 + 8 * d + kv * 8),
                   "prefix[length=10]": 10 * L * 2 * kv, "pfeiffer": L * (2 * d + 2 + d * 2 + d)}
    gates = L * 2 * (d + 1) + L * (ffn + 1) + L * 2 * (kv + 1)
    assert report["trainable_params"] == sum(own.values()) + gates == 3086
    assert report["changed_params"] == report["trainable_params"]  # nothing merges: the parameters it adds
    assert report["ranks"] == {f"model.layers.{i}.self_attn.{p}_proj": 8 for i in range(L) for p in "qv"}


# -- files ---------------------------------------------------------------------------------------------------
def test_unipelt_save_load(tmp_path):
    pm = _apply("gpt2", "unipelt[length=4,r=4]")
    randomize_adapter(pm, std=0.3, seed=6)
    batch = tiny_batch(pm.model, batch=3, seq=8)
    expected = first_output(pm(**batch)).detach()
    pm.save(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "parts.1.gates.0.weight" in keys and keys["parts.1.gates.0.weight"].shape == (2, 32)
    assert "parts.0.base_model.model.transformer.h.0.attn.c_attn.gate.weight" in keys
    assert "parts.2.base_model.model.transformer.h.1.mlp.c_proj.adapter_up.weight" in keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PEFTLAB"
    loaded = peftlab.load(tiny_model("gpt2"), tmp_path)
    torch.testing.assert_close(first_output(loaded(**batch)), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["lora[gate=true]", "houlsby[gate=true]", "prefix[gate=true,length=3]"])
def test_a_gated_part_alone_saves_in_our_format(method, tmp_path):
    pm = _apply("llama", method)
    randomize_adapter(pm, std=0.3, seed=7)
    expected = main_output(pm)
    pm.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PEFTLAB"
    loaded = peftlab.load(tiny_model("llama"), tmp_path)
    assert loaded.configs["default"].gate is True
    torch.testing.assert_close(main_output(loaded), expected, atol=1e-6, rtol=0)
    if method.startswith("lora"):
        with pytest.raises(RuntimeError, match="cannot be merged"):
            pm.merge()


# -- mixed batches ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,a,b", [
    ("llama", "lora[gate=true]", "lora[gate=true,r=4,alpha=4]"),
    ("gpt2", "lora[gate=true]", "lora[gate=true,r=2]"),
    ("bert", "pfeiffer[gate=true]", "pfeiffer[gate=true,r=3]"),
])
def test_gated_parts_batch_per_row(monkeypatch, kind, a, b):
    model = tiny_model(kind)
    assert_gathered_mixed_batch(monkeypatch, GatedDelta, model, a, b, batch=tiny_batch(model, batch=3, seq=8)
                                if kind == "bert" else None, std=0.3)


def test_a_gated_prefix_refuses_a_mixed_batch():
    pm = peftlab.apply(tiny_model("llama"), "prefix[gate=true,length=2]", adapter_name="a")
    pm.add_adapter("b", "prefix[gate=true,length=2]")
    with pytest.raises(NotImplementedError, match="gate=true.*does not batch per row"):
        main_output(pm, adapter_names=["a", "b", None])


# -- training ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mam[length=4]", "unipelt[length=4]"])
def test_hybrids_learn_a_tiny_teacher_with_every_part(method):
    """25 AdamW steps at the declared lr toward a randomized adapter of the same hybrid: the loss
    falls by more than half, and every part's parameters (gates included) move."""
    pm = _apply("llama", method)
    randomize_adapter(pm, std=0.3)
    with torch.no_grad():
        target = first_output(pm(input_ids=IDS))
    pm.add_adapter("student", method)
    pm.set_adapter("student")
    before = {n: p.detach().clone() for n, p in pm.adapter_modules["student"].named_parameters()}
    pm.train()
    spec = peftlab.core.registry.get_method(method.split("[")[0])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=spec.default_lr, weight_decay=0.0)
    losses = []
    for _ in range(25):
        loss = F.mse_loss(first_output(pm(input_ids=IDS)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0], losses
    moved = {n for n, p in pm.adapter_modules["student"].named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before), sorted(set(before) - moved)
