"""Quantized base (peftlab.quant): 4-bit NF4 layers through bitsandbytes, methods on them, qlora,
LoftQ, merging into a 4-bit base, PEFT files both ways.

Numbers are printed (run with -s): the quantized model's output error against the float model,
the merge / unmerge requantization errors, LoftQ's error against zero-init LoRA.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
import test_engine  # the registry-driven checks, rerun here on quantized tiny models
from conftest import first_output, randomize_adapter
from peftlab.core.config import ConfigError, config_from_dict
from peftlab.core.layers import weight_out_in
from peftlab.core.quantized import dequantize, is_4bit, roundtrip
from peftlab.methods.reparam.lora.loftq import loftq_factors, quantization_error
from peftlab.quant import QLoraConfig, QuantizationError, model_bytes, quantize
from peftlab.zoo import tiny_batch, tiny_model

bnb = pytest.importorskip("bitsandbytes")  # a dev dependency: present wherever the suite runs

#: NF4's largest gap between neighbouring levels is 1 − 0.6962 (the two lowest levels), so a value
#: is at most 0.152 of its block's absmax away from its level; double quantization of the absmax
#: (8-bit, blocks of 256) adds well under 1%.
NF4_HALF_GAP = 0.16


def qtiny(kind: str, task: str = "base", seed: int = 0):
    """A tiny model from the zoo with its Linear layers in 4-bit NF4."""
    return quantize(tiny_model(kind, task=task, seed=seed))


def _out(model, batch):
    with torch.no_grad():
        return first_output(model(**batch))


# -- quantize ------------------------------------------------------------------------------------
def test_quantize_keeps_names_and_lays_out_keys_as_bitsandbytes():
    model = tiny_model("llama")
    names_before = [n for n, _ in model.named_modules()]
    linear = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    keys_before = list(model.state_dict())
    assert quantize(model) is model
    assert [n for n, _ in model.named_modules()] == names_before
    report = model.quantization_report
    assert report.skipped == ["lm_head"] and sorted(report.layers) == sorted(set(linear) - {"lm_head"})
    assert type(model.lm_head) is nn.Linear and model.is_loaded_in_4bit
    sd = model.state_dict()
    stats = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
    for name in report.layers:
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit) and is_4bit(layer)
        out_f, in_f = linear[name]
        assert sd[f"{name}.weight"].dtype == torch.uint8 and sd[f"{name}.weight"].shape == (out_f * in_f // 2, 1)
        assert all(f"{name}.weight.{s}" in sd for s in stats)
    # Every float key is still there, in the same order; the new ones are bitsandbytes' statistics.
    assert [k for k in sd if k in keys_before] == keys_before
    assert all(".weight." in k for k in sd if k not in keys_before)


def test_memory_report_follows_the_storage_formula():
    """n weights: n/2 packed bytes, n/64 one-byte block scales, their float32 scales per 256
    blocks and offset, and the 16-entry NF4 and 256-entry 8-bit code books."""
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 512))
    before = model_bytes(model)
    assert before == 4 * (2 * 512 * 256 + 256 + 512)
    report = quantize(model).quantization_report
    n = 512 * 256
    per_layer = n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4 + 16 * 4 + 256 * 4
    assert (report.bytes_before, report.bytes_after) == (before, 4 * (256 + 512) + 2 * per_layer)
    assert report.bytes_after == model_bytes(model) and report.ratio < 0.14
    print(f"\n{report}")


def test_each_layer_multiplies_by_the_nf4_roundtrip_of_its_weight():
    model = tiny_model("llama")
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize(model)
    x = torch.randn(3, 32)
    for name in model.quantization_report.layers:
        layer = model.get_submodule(name)
        deq = dequantize(layer)
        assert torch.equal(deq, roundtrip(floats[name])) and torch.equal(weight_out_in(layer), deq)
        if layer.in_features == 32:
            with torch.no_grad():
                torch.testing.assert_close(layer(x), F.linear(x, deq, layer.bias), atol=1e-5, rtol=0)
        size = layer.weight.blocksize  # 64, or 32 for the tiny models' rows of 32 (blocksize_for)
        assert size == (64 if layer.in_features % 64 == 0 else 32)
        blocks_w, blocks_err = floats[name].reshape(-1, size), (deq - floats[name]).reshape(-1, size)
        assert (blocks_err.abs().amax(1) <= NF4_HALF_GAP * blocks_w.abs().amax(1)).all()


def test_quantized_model_outputs_close_to_float():
    model = tiny_model("llama")
    batch = tiny_batch(model, batch=3, seq=8)
    ref = _out(model, batch)
    err = (_out(quantize(model), batch) - ref).abs().max().item()
    print(f"\ntiny llama logits: max |quantized - float| = {err:.4f} (max |logit| {ref.abs().max().item():.3f})")
    assert 0 < err < 0.3 * ref.abs().max().item()


@pytest.mark.real
def test_minilm_quantized_embeddings_close_to_float():
    model, tok = peftlab.zoo.load("minilm")
    batch = tok(["a cat sat on the mat", "quantized weights keep the meaning"], return_tensors="pt", padding=True)
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def embed(m):  # all-MiniLM-L6-v2's sentence embedding: the mean over the real tokens
        return (_out(m, batch) * mask).sum(1) / mask.sum(1)

    ref = embed(model)
    got = embed(quantize(model))
    cos = F.cosine_similarity(got, ref, dim=-1)
    print(f"\nMiniLM: {model.quantization_report}; sentence embeddings: max |diff| "
          f"{(got - ref).abs().max().item():.4f}, cosine {[round(c, 4) for c in cos.tolist()]}")
    assert (cos > 0.95).all()


def test_quantize_errors():
    with pytest.raises(QuantizationError, match="no Linear layer.*Conv2d"):
        quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    head_only = nn.Module()
    head_only.lm_head = nn.Linear(4, 4)
    with pytest.raises(QuantizationError, match="no Linear layer.*output heads or skipped"):
        quantize(head_only)
    with pytest.raises(QuantizationError, match="kind='int3'"):
        quantize(tiny_model("llama"), "int3")
    with pytest.raises(QuantizationError, match="compute_dtype='half'"):
        quantize(tiny_model("llama"), compute_dtype="half")
    pm = peftlab.apply(tiny_model("llama"), "lora")
    with pytest.raises(QuantizationError, match="carries adapters"):
        quantize(pm.model)
    assert not any(is_4bit(m) for m in pm.model.modules())


def test_missing_bitsandbytes_names_the_pip_command():
    """In a fresh interpreter where ``import bitsandbytes`` fails: peftlab imports, quantize refuses."""
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import peftlab; from peftlab.quant import quantize; from peftlab.zoo import tiny_model\n"
            "m = tiny_model('llama')\n"
            "try:\n    quantize(m)\nexcept ImportError as e:\n    print('ERR', e)\n"
            "print('UNCHANGED', not m.model.layers[0].self_attn.q_proj.__class__.__name__.endswith('4bit'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "ERR 4-bit quantization needs bitsandbytes" in out and "pip install 'bitsandbytes>=0.45,<1'" in out
    assert "UNCHANGED True" in out


def test_skip_and_keep_in_fp32_modules():
    model = quantize(tiny_model("llama"), skip=["re:.*\\.mlp\\..*"])
    assert not any(is_4bit(m) for n, m in model.named_modules() if ".mlp." in n)
    assert all(is_4bit(model.get_submodule(n)) for n in model.quantization_report.layers)
    t5 = quantize(tiny_model("t5"))  # T5 keeps "wo" in float32 (it casts its input to wo's dtype)
    assert all(not is_4bit(m) for n, m in t5.named_modules() if n.endswith(".wo"))
    assert any(is_4bit(m) for m in t5.modules())
    batch = tiny_batch(t5, batch=2, seq=6)
    assert torch.isfinite(_out(t5, batch)).all()


def test_adapters_follow_a_4bit_layer_without_bias():
    """A bias-free 4-bit layer has no float tensor: the deltas take the device and the float dtype
    its weight stands for; a bfloat16 base gets float32 adapters, as any half-precision base."""
    model = quantize(tiny_model("llama").to(torch.bfloat16))
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.dtype == torch.bfloat16
    pm = peftlab.apply(model, "lora")
    assert {p.dtype for p in pm.adapter_modules.parameters()} == {torch.float32}
    batch = tiny_batch(model, batch=2, seq=6)
    randomize_adapter(pm)
    out = _out(pm, batch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_report_counts_4bit_entries():
    float_model = tiny_model("llama")
    pm = peftlab.apply(qtiny("llama"), "dora")
    float_pm = peftlab.apply(float_model, "dora")
    ours, theirs = pm.report(), float_pm.report()
    for key in ("base_params", "changed_params", "trainable_params"):
        assert ours[key] == theirs[key], key


# -- methods on a quantized base -------------------------------------------------------------------
METHODS = ["lora", "dora", "ia3", "houlsby", "pfeiffer", "loha"]


@pytest.mark.parametrize("method", METHODS)
def test_method_on_quantized_llama_trains_saves_and_loads(method, tmp_path):
    """Identity at init on the 4-bit base, deltas on Linear4bit layers (for the methods placed on
    linear layers); training steps change the adapter and leave the 4-bit base as it was; the saved
    adapter loads into a freshly quantized base with identical outputs. (The tiny-teacher loss,
    mixed batches and gradients: test_engine_checks_on_quantized_models.)"""
    model = qtiny("llama")
    batch = tiny_batch(model, batch=3, seq=8)
    base_out = _out(model, batch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftlab.apply(model, method)
    assert torch.equal(_out(pm, batch), base_out)
    hooked = [type(model.get_submodule(n)) for _, n, _ in pm.placements["default"]]
    if method in ("lora", "dora", "ia3", "loha"):
        assert bnb.nn.Linear4bit in hooked
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=peftlab.get_method(method).default_lr)
    for _ in range(5):  # push the outputs towards 0: any loss moves the adapter
        first_output(pm(**batch)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    expected = _out(pm, batch)
    assert not torch.allclose(expected, base_out, atol=1e-5)
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    pm.save(tmp_path)
    loaded = peftlab.load(qtiny("llama"), tmp_path)
    assert torch.equal(_out(loaded, batch), expected)


ENGINE_METHODS = METHODS
ENGINE_KINDS = ["llama", "bert", "gpt2"]
ENGINE_PAIRS = [(m, k) for m in ENGINE_METHODS for k in ENGINE_KINDS if (m, k) in test_engine.PAIRS]
ENGINE_CHECKS = [
    test_engine.test_identity_at_init_and_unload,
    test_engine.test_save_load_fresh_base,
    test_engine.test_mixed_batch_equals_per_adapter,
    test_engine.test_gradients_reach_only_each_rows_adapter,
    test_engine.test_learns_a_tiny_teacher,
]


@pytest.mark.parametrize("check", ENGINE_CHECKS, ids=[c.__name__[5:] for c in ENGINE_CHECKS])
@pytest.mark.parametrize("method,kind", ENGINE_PAIRS, ids=[f"{m}-{k}" for m, k in ENGINE_PAIRS])
def test_engine_checks_on_quantized_models(check, method, kind, monkeypatch, tmp_path):
    """tests/test_engine.py's checks, with every tiny model it builds quantized to 4-bit (merging is
    checked below, with the requantization error as its tolerance)."""
    assert len(ENGINE_PAIRS) == len(ENGINE_METHODS) * len(ENGINE_KINDS)
    monkeypatch.setattr(test_engine, "tiny_model", qtiny)
    kwargs = {"tmp_path": tmp_path} if "tmp_path" in check.__code__.co_varnames else {}
    if "monkeypatch" in check.__code__.co_varnames:
        kwargs["monkeypatch"] = monkeypatch
    check(method, kind, **kwargs)


# -- merging into a 4-bit base ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_requantizes_and_reports_the_error(method):
    """merge: each 4-bit layer becomes q(deq(Q) + ΔW); the reported error is max |deq(new) − (deq(Q)
    + ΔW)|, recomputed here, and lies within NF4's bound. unmerge: within the two errors."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    batch = tiny_batch(model, batch=3, seq=8)
    float_out = _out(model, batch)
    quant_err = (_out(quantize(model), batch) - float_out).abs().max().item()  # what quantizing costs
    pm = peftlab.apply(model, method)
    randomize_adapter(pm, std=0.02)
    expected = _out(pm, batch)
    placed = pm.placed("default")
    before = {n: dequantize(model.get_submodule(n)) for n in placed}
    float_merge = {n: before[n] + d.delta_params(model.get_submodule(n))["weight"] for n, d in placed.items()
                   if "weight" in d.merges_into}
    errors = pm.merge()
    assert errors == pm.merge_report["default"] and set(errors) == set(float_merge)
    for n, want in float_merge.items():
        err = (dequantize(model.get_submodule(n)) - want).abs().max().item()
        assert errors[n] == pytest.approx(err, abs=1e-7)
        assert 0 < err <= NF4_HALF_GAP * want.abs().max().item()
    out_err = (_out(pm, batch) - expected).abs().max().item()
    print(f"\n{method}: outputs: quantizing the base moves them by {quant_err:.3f}, merging by {out_err:.3f}")
    # The order of what quantizing costs (the merged layers are requantized once): well below the outputs.
    assert 0 < out_err < min(2 * quant_err, 0.25 * expected.abs().max().item())
    back = pm.unmerge()
    assert pm.merge_report == {} and set(back) == set(float_merge)
    for n in float_merge:
        drift = (dequantize(model.get_submodule(n)) - before[n]).abs().max().item()
        assert drift <= errors[n] + back[n] + 1e-6
    print(f"\n{method}: merge error max {max(errors.values()):.2e}, output error {out_err:.2e}, "
          f"unmerge error max {max(back.values()):.2e}")
    merged = pm.merge_and_unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    assert all(is_4bit(merged.get_submodule(n)) for n in float_merge)


@pytest.mark.real
def test_merge_error_small_on_a_real_weight():
    """MiniLM's first query projection with a LoRA update of a trained size: the merged 4-bit
    weight is within NF4's bound of the float merge, far below the weight's own scale."""
    model, _ = peftlab.zoo.load("minilm")
    quantize(model)
    pm = peftlab.apply(model, "lora[r=8,alpha=16,targets=query,layers=0]")
    randomize_adapter(pm, std=0.01)
    (name, delta), = pm.placed("default").items()
    layer = model.get_submodule(name)
    want = dequantize(layer) + delta.delta_out_in().detach()
    err = pm.merge()[name]
    assert err == pytest.approx((dequantize(layer) - want).abs().max().item(), abs=1e-7)
    print(f"\nMiniLM {name}: merge requantization error {err:.4f}, max |W| {want.abs().max().item():.3f}")
    assert err < 0.05 * want.abs().max().item()


# -- qlora -----------------------------------------------------------------------------------------
def test_qlora_string_quantizes_then_places_lora(tmp_path):
    cfg = peftlab.parse_method_string("qlora[r=4,alpha=16,targets=all-linear,double_quant=true,skip=down_proj]")
    assert isinstance(cfg, QLoraConfig) and cfg.to_string() == "qlora[targets=all-linear,r=4,alpha=16,skip=down_proj]"
    assert peftlab.parse_method_string(cfg.to_string()).to_dict() == cfg.to_dict()
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()
    model = tiny_model("llama")
    batch = tiny_batch(model, batch=3, seq=8)
    pm = peftlab.apply(model, cfg)
    assert pm.model is model and model.quantization_report.kind == "nf4"
    placed = pm.placed("default")
    assert all(is_4bit(model.get_submodule(n)) for n in placed if not n.endswith("down_proj"))
    assert all(not is_4bit(model.get_submodule(n)) for n in placed if n.endswith("down_proj"))
    assert type(pm.configs["default"]) is peftlab.LoraConfig and pm.configs["default"].r == 4
    with pm.disable_adapters():
        base = _out(pm, batch)
    assert torch.equal(_out(pm, batch), base)
    pm.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_qlora_on_the_command_line_uses_loras_declarations():
    from peftlab.core.config import adapter_method
    from peftlab.train.cli import method_default_lr

    assert adapter_method(peftlab.parse_method_string("qlora[r=8]")) == "lora"
    assert method_default_lr("qlora[r=8]") == peftlab.get_method("lora").default_lr


def test_qlora_refusals():
    with pytest.raises(ConfigError, match="cannot be part of a union"):
        peftlab.parse_method_string("qlora[r=4]+ia3")
    with pytest.raises(ConfigError, match="quant_type"):
        peftlab.parse_method_string("qlora[quant_type=int8]")
    pm = peftlab.apply(qtiny("llama"), "lora")
    with pytest.raises(ConfigError, match="qlora changes the base model"):
        pm.add_adapter("q", "qlora[r=4]")
    with pytest.raises(QuantizationError, match="applied to a plain model"):
        peftlab.apply(pm, "qlora[r=4]", adapter_name="q")


# -- LoftQ -----------------------------------------------------------------------------------------
def test_loftq_factors_are_the_svd_of_the_residual():
    """Against a direct formula: Q_1 = q(W); s·B A = U_r S_r V_rᵀ of W − Q_T; Q_2 = q(W − s·B_1 A_1)."""
    gen = torch.Generator().manual_seed(0)
    w, r, s = torch.randn(48, 64, generator=gen) * 0.05, 4, 2.0
    one = loftq_factors(w, r, s, iters=1)
    assert torch.equal(one.q, roundtrip(w)) and torch.equal(one.source, w)
    U, S, Vh = torch.linalg.svd(w - one.q)
    torch.testing.assert_close(s * one.B @ one.A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-6, rtol=0)
    two = loftq_factors(w, r, s, iters=2)
    torch.testing.assert_close(two.source, w - s * one.B @ one.A, atol=0, rtol=0)
    assert torch.equal(two.q, roundtrip(two.source))


@pytest.mark.real
def test_loftq_lowers_the_quantization_error_on_minilm():
    model, _ = peftlab.zoo.load("minilm")
    w = model.encoder.layer[0].attention.self.query.weight.detach()
    q = roundtrip(w)
    plain = quantization_error(w, q)
    errors = {}
    for iters in (1, 5):
        f = loftq_factors(w, 16, 2.0, iters)
        errors[iters] = quantization_error(w, f.q, f.A, f.B, 2.0)
    print(f"\nMiniLM layer 0 query: ‖W − Q‖ = {plain:.4f} (zero-init LoRA); LoftQ r=16: 1 step {errors[1]:.4f}, "
          f"5 steps {errors[5]:.4f}")
    assert errors[1] < plain and errors[5] < plain


def test_qlora_loftq_end_to_end(tmp_path):
    """qlora[init=loftq] quantizes the layers from LoftQ's chosen matrices and writes its factors:
    each targeted layer stores exactly LoftQ's Q, its error is below zero-init LoRA's, the model's
    outputs are closer (root mean square) to the float model's than the plainly quantized model's;
    the file says loftq as PEFT's does."""
    float_model = tiny_model("llama")
    batch = tiny_batch(float_model, batch=3, seq=8)
    ref = _out(float_model, batch)
    weights = {n: m.weight.detach().clone() for n, m in float_model.named_modules() if isinstance(m, nn.Linear)}
    pm = peftlab.apply(float_model, "qlora[r=4,alpha=8,init=loftq,loftq_iter=2,targets=all-linear]")
    assert len(pm.placed("default")) == 14
    for name, delta in pm.placed("default").items():
        f = loftq_factors(weights[name], 4, 2.0, iters=2)
        layer = pm.model.get_submodule(name)
        assert torch.equal(dequantize(layer), f.q)
        assert torch.equal(delta.lora_A.weight, f.A) and torch.equal(delta.lora_B.weight, f.B)
        assert quantization_error(weights[name], f.q, f.A, f.B, 2.0) < quantization_error(weights[name], f.q)
    rms = lambda out: (out - ref).pow(2).mean().sqrt().item()  # noqa: E731
    plain_err, loftq_err = rms(_out(qtiny("llama"), batch)), rms(_out(pm, batch))
    print(f"\ntiny llama logits, RMS error vs float: quantized {plain_err:.4f}, quantized + LoftQ {loftq_err:.4f}")
    assert loftq_err < 0.9 * plain_err
    pm.save(tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["init_lora_weights"] == "loftq" and fields["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    assert peftlab.load(qtiny("llama"), tmp_path).configs["default"].to_dict() == pm.configs["default"].to_dict()


def test_loftq_needs_4bit_lora_layers():
    with pytest.raises(ConfigError, match="float layer.*qlora\\[init=loftq"):
        peftlab.apply(tiny_model("llama"), "lora[init=loftq]")
    with pytest.raises(ConfigError, match="dora: init=loftq is a LoRA init"):
        peftlab.apply(qtiny("llama"), "dora[init=loftq]")
    with pytest.raises(ConfigError, match="loftq_iter"):
        peftlab.parse_method_string("lora[init=loftq,loftq_iter=0]")
    with pytest.raises(QuantizationError, match="stays in float"):
        peftlab.apply(tiny_model("llama"), "qlora[init=loftq,targets=q_proj|lm_head]")


# -- PEFT files both ways --------------------------------------------------------------------------
def test_qlora_files_both_ways_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    batch = tiny_batch(tiny_model("llama"), batch=3, seq=8)
    pm = peftlab.apply(tiny_model("llama"), "qlora[r=4,alpha=8,targets=all-linear]")
    randomize_adapter(pm)
    ours = _out(pm, batch)
    pm.save(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(qtiny("llama"), tmp_path / "ours")
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    assert (_out(theirs, batch) - ours).abs().max().item() <= 1e-5
    peft_model = peft.get_peft_model(qtiny("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    expected = _out(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = peftlab.load(qtiny("llama"), tmp_path / "peft")
    assert (_out(loaded, batch) - expected).abs().max().item() <= 1e-5
