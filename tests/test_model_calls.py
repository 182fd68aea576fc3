"""peftlab/core/model_calls.py on the installed transformers (5.24 in .venv, 4.57 in .venv-compat).

The cache argument's name is read from the model itself (``cache`` since transformers 5.24,
``past_key_values`` before) and the same name is what the model's outputs, ``generate`` and
``prepare_inputs_for_generation`` use; a model without a cache gets an error naming its class. Prefix
``generate()`` through the key/value cache gives the tokens of manual greedy loops (with and without
the cache) on tiny Llama and GPT-2.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

import peftlab
from peftlab.core.model_calls import cache_argument, pass_cache
from peftlab.methods.additive.prefix import PrefixConfig
from peftlab.zoo.tiny import tiny_model

from conftest import one_thread

NAMES = ("cache", "past_key_values")
#: the name this transformers uses: the rename came with 5.24
EXPECTED = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


# Tiny tensors: one intra-op thread is faster, and much faster when other jobs share the cores.
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def signature_names(fn) -> list[str]:
    return [n for n in inspect.signature(fn).parameters if n in NAMES]


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2", "t5"])
def test_name_is_the_one_in_the_models_own_signature(kind):
    model = tiny_model(kind)
    assert signature_names(type(model).forward) == [EXPECTED]  # what this transformers declares
    assert cache_argument(model) == EXPECTED


def test_head_without_the_argument_is_read_through_its_backbone_and_gets_the_cache_there():
    model = tiny_model("bert", "classification")
    assert signature_names(type(model).forward) == []  # BertForSequenceClassification names no cache
    assert cache_argument(model) == EXPECTED == signature_names(type(model.base_model).forward)[0]
    ids = torch.randint(3, 128, (2, 5))
    cache = DynamicCache()
    kw = {"input_ids": ids}
    assert pass_cache(model, kw, cache) == EXPECTED and kw[EXPECTED] is cache
    with torch.no_grad():
        model(**kw)
    assert cache.get_seq_length() == 5  # the backbone's layers wrote into it
    assert not model._forward_pre_hooks and not model._forward_hooks and not model.base_model._forward_pre_hooks


def test_layers_have_their_own_name_too():
    model = tiny_model("t5")
    block = model.get_encoder().block[0].layer[0]  # T5's encoder self-attention sublayer
    assert cache_argument(block) == EXPECTED == signature_names(type(block).forward)[0]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_outputs_generate_and_prepare_inputs_use_the_same_name(kind):
    model = tiny_model(kind)
    name = cache_argument(model)
    assert signature_names(model.prepare_inputs_for_generation) == [name]
    ids = torch.randint(3, 128, (1, 4))
    extra = {"decoder_input_ids": ids[:, :2]} if kind == "t5" else {}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **extra)
    assert isinstance(out[name], Cache) and isinstance(getattr(out, name), Cache)
    assert [k for k in out.keys() if k in NAMES] == [name]  # the field itself (5.24 aliases the old name)
    given = DynamicCache() if kind != "t5" else transformers.EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        gen = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                             **{name: given})
    assert getattr(gen, name) is given  # generate took the cache under this name and filled it
    assert given.get_seq_length() > 0


@pytest.mark.parametrize("module", [tiny_model("vit"), nn.Linear(2, 2)], ids=["vit", "linear"])
def test_no_cache_argument_is_an_error_naming_the_class(module):
    with pytest.raises(TypeError, match=rf"^{type(module).__name__} takes no key/value cache"):
        cache_argument(module)


# -- prefix generate through the cache --------------------------------------------------------------
def causal_lm(kind):
    model = tiny_model(kind, "causal-lm")
    model.generation_config.eos_token_id = None  # never stop early: every row gets all its tokens
    return model


def no_cache_loop(pm, ids, mask, steps):
    """Greedy: the whole sequence again at every step."""
    for _ in range(steps):
        nxt = pm(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def cached_loop(pm, ids, mask, steps):
    """Greedy: one token per step, passing back the cache the previous call returned."""
    name = cache_argument(pm.model)
    out = pm(input_ids=ids, attention_mask=mask, use_cache=True)
    for step in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        if step < steps - 1:
            out = pm(input_ids=nxt, attention_mask=mask, use_cache=True, **{name: getattr(out, name)})
    return ids


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("offset", [True, False])
def test_prefix_generate_with_cache_equals_manual_greedy_loops(kind, offset):
    torch.manual_seed(0)  # N(0, 1) keys and values: a prefix that visibly changes the tiny models' tokens
    pm = peftlab.apply(causal_lm(kind), PrefixConfig(length=3, init="random", offset_positions=offset))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    with torch.no_grad():
        generated = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        with pm.disable_adapters():
            base = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        manual, incremental = no_cache_loop(pm, ids, mask, 5), cached_loop(pm, ids, mask, 5)
    assert generated.shape == (2, 11)
    assert torch.equal(generated, manual)
    assert torch.equal(generated, incremental)
    assert not torch.equal(generated, base)  # the prefix really acted
    assert not pm.model._forward_pre_hooks  # generate's helpers are gone with its cache
