"""Houlsby sequential adapter: the five criteria of METHODS.md on tiny random models.

y ← y + W_up σ(W_down y + b_down) + b_up after the attention output and FFN output projections.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import peftlab
from peftlab.core.targeting import layer_index
from peftlab.methods.additive.houlsby import HoulsbyAdapter, HoulsbyConfig

pytestmark = pytest.mark.filterwarnings("ignore")


# -- tiny models ----------------------------------------------------------------------------------
def bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)).eval()


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()


def t5():
    torch.manual_seed(0)
    return transformers.T5Model(transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)).eval()


def vit():
    torch.manual_seed(0)
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


MODELS = {"bert": bert, "llama": llama, "gpt2": gpt2}
IDS = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(3))


def out(model, ids=IDS, **kw) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=ids, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def randomize(pm, adapter="default", seed=0, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_modules[adapter].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def delta_at(pm, name, adapter="default") -> HoulsbyAdapter:
    return next(d for _, n, d in pm.placements[adapter] if n == name)


# -- 1. math ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_bert_module_matches_formula(activation):
    model = bert()
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
    model = gpt2()
    pm = peftlab.apply(model, "houlsby[r=3]")
    randomize(pm)
    layer = model.transformer.h[1].mlp.c_proj  # Conv1D: weight is (in, out)
    d = delta_at(pm, "transformer.h.1.mlp.c_proj")
    x = torch.randn(2, 4, 128)
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
    model = {"bert": bert, "vit": vit, "llama": llama, "gpt2": gpt2}[kind]()
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
    pm = peftlab.apply(t5(), "houlsby")
    names = [n for _, n, _ in pm.placements["default"]]
    enc = [n for n in names if n.startswith("encoder.")]
    dec = [n for n in names if n.startswith("decoder.")]
    assert len(enc) == 4 and len(dec) == 6  # encoder: self-attn + FFN; decoder: + cross-attention
    assert all(n.endswith((".SelfAttention.o", ".EncDecAttention.o", ".DenseReluDense.wo")) for n in names)


# -- 2. identity at init ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_identity_at_init(kind):
    model = MODELS[kind]()
    base = out(model)
    pm = peftlab.apply(model, "houlsby[reduction_factor=4,activation=gelu]")
    assert torch.equal(out(pm), base)


# -- 3. counts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_counts_match_formula(kind):
    d, layers = 32, 2
    pm = peftlab.apply(MODELS[kind](), "houlsby")  # reduction_factor 16 -> m = 2
    m = d // 16
    per_adapter = d * m + m + m * d + d  # W_down, b_down, W_up, b_up
    rep = pm.report()
    assert rep["trainable_params"] == rep["changed_params"] == 2 * layers * per_adapter
    assert rep["ranks"] == {}  # nonlinear: no ΔW
    assert rep["modules"] == 2 * layers
    pm2 = peftlab.apply(MODELS[kind](), HoulsbyConfig(r=5))
    assert pm2.report()["trainable_params"] == 2 * layers * (d * 5 + 5 + 5 * d + d)


# -- 4. files, merge, unload --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_save_load_same_outputs(kind, tmp_path):
    pm = peftlab.apply(MODELS[kind](), "houlsby[reduction_factor=4]")
    randomize(pm)
    expected = out(pm)
    pm.save(tmp_path)
    keys = set(pm.adapter_tensors())
    assert all(k.startswith("base_model.model.") and k.split(".")[-2] in ("adapter_down", "adapter_up") for k in keys)
    assert len(keys) == 4 * 4
    loaded = peftlab.load(MODELS[kind](), tmp_path)
    assert loaded.configs["default"] == pm.configs["default"]
    torch.testing.assert_close(out(loaded), expected, atol=1e-6, rtol=0)


def test_merge_refused_and_unload_bit_identical():
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftlab.apply(model, "houlsby")
    randomize(pm)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        pm.merge()
    with pytest.raises(RuntimeError, match="cannot be merged"):
        pm.merge_and_unload()
    base = pm.unload()
    after = base.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(out(base), out(bert()), atol=0, rtol=0)


# -- mixed batches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_mixed_batch_equals_per_adapter(kind):
    pm = peftlab.apply(MODELS[kind](), "houlsby[reduction_factor=4]", adapter_name="a")
    pm.add_adapter("b", HoulsbyConfig(r=3, activation="silu"))
    randomize(pm, "a", seed=1)
    randomize(pm, "b", seed=2)
    names = ["a", "b", None]
    mixed = out(pm, adapter_names=names)
    for i, n in enumerate(names):
        if n is None:
            with pm.disable_adapters():
                ref = out(pm)
        else:
            pm.set_adapter(n)
            ref = out(pm)
        assert (mixed[i] - ref[i]).abs().max().item() <= 1e-5


# -- 5. it trains ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_trains_and_only_adapter_gets_gradients(kind):
    """A fresh adapter learns to reproduce the hidden states of a randomized one (a reachable target)."""
    model = MODELS[kind]().train()
    pm = peftlab.apply(model, "houlsby[reduction_factor=4]", adapter_name="teacher")
    randomize(pm, "teacher", std=0.3)
    with torch.no_grad():
        target = pm(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
    pm.add_adapter("student", "houlsby[reduction_factor=4]")
    pm.set_adapter("student")
    params = [p for p in pm.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in pm.adapter_modules["student"].parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(pm(input_ids=IDS, output_hidden_states=True).hidden_states[-1], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in pm.adapter_modules["teacher"].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


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
        peftlab.apply(bert(), "houlsby[targets=nope]")
