"""LLaMA-Adapter (peftlab/methods/additive/llama_adapter.py) on tiny random Llama (GQA).

What is specific to it: the gated prompt attention against a naive per-head loop and one adapted
layer against the direct formula, zero-init (the base exactly, and only the gate learns at the first
step), counts and the choice of the top layers, what it applies to, generate() against a no-cache
greedy loop, per-row prompts of different lengths, gradient checkpointing, and files both ways with
Hugging Face PEFT (ADAPTION_PROMPT) with equal outputs and generations.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import transformers

import peftlab
from peftlab.core.config import ConfigError
from peftlab.methods.additive.llama_adapter import LlamaAdapterConfig, gated_prompt_attention, rotate

from conftest import one_thread
from test_prefix import (
    TOL, assert_same_run, checkpointing_gradient_change, generate, greedy_loop, ids_and_mask, llama, lm_losses,
)

pytestmark = pytest.mark.filterwarnings("ignore")
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
ATTN = "model/layers/1/self_attn"


def trained(pm, name="default", seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_modules[name].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return pm


# -- config and applicability ------------------------------------------------------------------------
def test_config_validation():
    for bad, field in (({"length": 0}, "length"), ({"adapter_layers": 0}, "adapter_layers"),
                       ({"adapter_layers": True}, "adapter_layers"), ({"layers": [1]}, "layers"),
                       ({"targets": ["q_proj"]}, "targets")):
        with pytest.raises(ConfigError, match=field):
            LlamaAdapterConfig(**bad)
    with pytest.raises(ConfigError, match="adapter_layers=3"):
        peftlab.apply(llama(), "llama_adapter[adapter_layers=3]")
    cfg = peftlab.parse_method_string("llama_adapter[length=4,adapter_layers=1]")
    assert peftlab.parse_method_string(cfg.to_string()).to_dict() == cfg.to_dict()


def test_needs_llama_style_attention():
    """Qwen3's attention normalises queries and keys (q_norm): the prompt's query could not be formed
    from W_q alone, so it is refused by the declared requirement, naming what is missing."""
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(peftlab.NotApplicableError, match="Llama-style decoder"):
        peftlab.apply(transformers.Qwen3ForCausalLM(cfg), "llama_adapter")
    mistral = transformers.MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)
    pm = peftlab.apply(transformers.MistralForCausalLM(mistral), "llama_adapter[adapter_layers=2]")
    assert sorted(pm.placed("default")) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


# -- criterion 1: the math -------------------------------------------------------------------------
def test_gated_prompt_attention_matches_a_per_head_loop():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, m, d = 2, 4, 2, 5, 3, 8
    q, k, v = torch.randn(B, H, T, d, generator=g), torch.randn(B, Hkv, m, d, generator=g), torch.randn(B, Hkv, m, d, generator=g)
    gate = torch.randn(B, 1, 1, 1, generator=g)
    mask = torch.zeros(B, 1, 1, m)
    mask[1, ..., 2] = torch.finfo(torch.float32).min  # row 1 has a 2-token prompt
    out = gated_prompt_attention(q, k, v, gate, mask)
    for b in range(B):
        keep = 3 if b == 0 else 2
        for h in range(H):
            kv = h // (H // Hkv)
            probs = torch.softmax(q[b, h] @ k[b, kv, :keep].T / math.sqrt(d), -1)
            want = gate[b, 0, 0, 0] * probs @ v[b, kv, :keep]
            assert (out[b, :, h * d:(h + 1) * d] - want).abs().max() <= 1e-6


def test_adapted_layer_matches_the_direct_formula():
    """o = Attn(x) + W_o(g · softmax(RoPE(W_q x)(A W_kᵀ)ᵀ/√d)(A W_vᵀ)), RoPE from transformers itself."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = llama()
    pm = trained(peftlab.apply(model, "llama_adapter[length=3,adapter_layers=1]"))
    ids, _ = ids_and_mask(pad=0)
    attn = model.model.layers[1].self_attn
    seen = {}
    hook = attn.register_forward_hook(lambda m, a, k, out: seen.update(x=k["hidden_states"], pe=k["position_embeddings"],
                                                                       out=out[0]), with_kwargs=True)
    with torch.no_grad():
        with pm.disable_adapters():
            pm(input_ids=ids)
        base_out = seen["out"]
        pm(input_ids=ids)
        hook.remove()
        x, (cos, sin), d = seen["x"], seen["pe"], 8
        q = attn.q_proj(x).view(2, 7, 4, d).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        delta = pm.adapter_modules["default"][ATTN]
        A, g = delta.adaption_prompt[0], delta.adaption_gate
        K = attn.k_proj(A).view(3, 2, d).transpose(0, 1).repeat_interleave(2, 0)  # (4 heads, 3, d)
        V = attn.v_proj(A).view(3, 2, d).transpose(0, 1).repeat_interleave(2, 0)
        att = g * torch.softmax(q @ K.transpose(-1, -2) / math.sqrt(d), -1) @ V
        want = base_out + attn.o_proj(att.transpose(1, 2).reshape(2, 7, 32))
        assert (seen["out"] - want).abs().max() <= TOL
        assert (rotate(q, cos, sin) - apply_rotary_pos_emb(q, q, cos, sin)[0]).abs().max() <= 1e-6


# -- criteria 2-4 ----------------------------------------------------------------------------------
def test_zero_init_gives_the_base_and_only_the_gate_learns_first():
    model = llama()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    pm = peftlab.apply(model, "llama_adapter[length=4]")
    pm.train()
    out = pm(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.equal(out.logits, base)  # g = 0: exactly the base model
    out.loss.backward()
    for name in ("model/layers/0/self_attn", ATTN):
        d = pm.adapter_modules["default"][name]
        assert d.adaption_gate.grad.abs().item() > 0
        assert d.adaption_prompt.grad.abs().max() == 0  # reaches the prompt only through g
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method, placed, trainable", [
    ("llama_adapter", ["model.layers.0.self_attn", "model.layers.1.self_attn"], 2 * (10 * 32 + 1)),
    ("llama_adapter[length=3,adapter_layers=1]", ["model.layers.1.self_attn"], 3 * 32 + 1),  # the top layer
])
def test_counts_and_top_layers(method, placed, trainable):
    pm = peftlab.apply(llama(), method)
    assert sorted(pm.placed("default")) == placed
    report = pm.report()
    assert report["trainable_params"] == report["changed_params"] == trainable
    assert report["ranks"] == {}


def test_loss_falls():
    """From the zero gate, on a random tiny LM (the generic tiny-teacher test uses the default lr)."""
    losses = lm_losses(peftlab.apply(llama(), "llama_adapter[length=4]"), 5e-2)
    assert losses[-1] < 0.8 * losses[0], losses


# -- generation, mixed batches, checkpointing ------------------------------------------------------
def test_generate_equals_greedy_loop():
    """The prompt keys carry no rotary embedding, so the adapter sees the queries' absolute positions
    (as in PEFT and the paper): generate numbers a left-padded row from its first real token, so the
    no-cache loop is given those positions too."""
    pm = trained(peftlab.apply(llama(), "llama_adapter[length=3]"))
    ids, mask = ids_and_mask()

    def loop(ids, mask, steps):
        logits = []
        for _ in range(steps):
            step = pm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        return ids, logits

    with torch.no_grad():
        batch = generate(pm, input_ids=ids, attention_mask=mask, max_new_tokens=6)
        assert_same_run(batch, loop(ids, mask, 6))
        unpadded = generate(pm, input_ids=ids[:1], max_new_tokens=6)
        assert_same_run(unpadded, greedy_loop(pm, ids[:1], torch.ones_like(ids[:1]), 6))
        with pm.disable_adapters():
            assert not torch.equal(generate(pm, input_ids=ids, attention_mask=mask, max_new_tokens=6)[0], batch[0])


def test_per_row_prompts_of_different_lengths():
    pm = trained(peftlab.apply(llama(), "llama_adapter[length=2]", adapter_name="a"), "a", seed=1)
    pm.add_adapter("b", "llama_adapter[length=5,adapter_layers=1]")
    trained(pm, "b", seed=2)
    ids, mask = ids_and_mask(batch=3)
    names = ["b", None, "a"]
    with torch.no_grad():
        mixed = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        mixed_gen = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                adapter_names=names)
        for i, name in enumerate(names):
            pm.set_adapter(name or "a")
            with pm.disable_adapters() if name is None else torch.no_grad():
                alone = pm(input_ids=ids, attention_mask=mask).logits[i]
                alone_gen = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)[i]
            real = mask[i].bool()
            assert (mixed[i][real] - alone[real]).abs().max() <= TOL, (i, name)
            assert torch.equal(mixed_gen[i], alone_gen)


def test_gradient_checkpointing_gives_the_same_gradient():
    """The checkpointed layers run again in backward: the hooks get the same keyword arguments."""
    pm = trained(peftlab.apply(llama(), "llama_adapter[length=3]"))
    assert checkpointing_gradient_change(pm, list(pm.adapter_modules["default"].parameters())) <= 1e-6


# -- Hugging Face PEFT interoperability -------------------------------------------------------------
def _peft_model():
    pp = peft.get_peft_model(llama(), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1,
                                                                target_modules="self_attn"))
    with torch.no_grad():  # "trained": move the prompt and open the gate
        for n, p in pp.named_parameters():
            if "adaption_" in n:
                p.add_(torch.randn_like(p) * 0.5)
    return pp.eval()


def _same(pm, pp):
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ours = pm(input_ids=ids, attention_mask=mask).logits
        assert (ours - llama()(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3
        diff = (ours - pp(input_ids=ids, attention_mask=mask).logits).abs().max().item()
        assert diff <= TOL, diff
        ours = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(ours, pp.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False))


def test_peft_file_loads_with_same_outputs(tmp_path):
    pp = _peft_model()
    pp.save_pretrained(tmp_path)
    pm = peftlab.load(llama(), tmp_path)
    cfg = pm.configs["default"]
    assert (cfg.method, cfg.length, cfg.adapter_layers) == ("llama_adapter", 3, 1)
    assert sorted(pm.placed("default")) == ["model.layers.1.self_attn"]
    _same(pm, pp)


def test_our_file_loads_in_peft_with_same_outputs(tmp_path):
    pm = trained(peftlab.apply(llama(), "llama_adapter[length=3]"))
    pm.save(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["peft_type"], written["adapter_len"], written["adapter_layers"], written["target_modules"]) == (
        "ADAPTION_PROMPT", 3, 2, "self_attn")
    pp = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    _same(pm, pp)
    with_head = peftlab.apply(transformers.LlamaForSequenceClassification(llama().config), "llama_adapter",
                              modules_to_save=["score"])
    with_head.save(tmp_path / "head")  # PEFT's ADAPTION_PROMPT has no modules_to_save
    assert json.loads((tmp_path / "head" / "adapter_config.json").read_text())["peft_type"] == "PEFTLAB"


def test_sub_batch_path_gives_each_delta_its_rows_of_the_call():
    """When a mixed batch cannot be gathered (two delta classes at one module), the dispatcher runs one
    sub-batch per adapter and hands a delta that reads the call (reads_call) that sub-batch's rows of
    it: here per-row rotary embeddings (batch 3)."""
    from peftlab.core.dispatch import _routed_sequential
    from peftlab.methods.additive.llama_adapter import LlamaAdapterDelta

    model = llama()
    attn = model.model.layers[1].self_attn
    a, b = LlamaAdapterDelta(attn, 3), type("Other", (LlamaAdapterDelta,), {})(attn, 2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 32, generator=g)
    with torch.no_grad():
        a.adaption_gate.fill_(0.7)
        b.adaption_gate.fill_(-0.4)
        cos, sin = model.model.rotary_emb(x, torch.arange(5)[None] + torch.tensor([[0], [2], [4]]))
        out = _routed_sequential([[a], [b]], torch.tensor([1, -1, 0]), x, y, input_site=False,
                                 call={"hidden_states": x, "position_embeddings": (cos, sin)})
        for i, d in ((0, b), (2, a)):
            alone = d(x[i:i + 1], y[i:i + 1], call={"position_embeddings": (cos[i:i + 1], sin[i:i + 1])})
            assert (out[i] - alone[0]).abs().max() <= 1e-6
        assert torch.equal(out[1], y[1])
