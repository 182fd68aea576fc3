"""The shared PEFT translation (peftlab/core/peft_format.py): targets with layers, IA3's bare-suffix
lists, classification-head entries and modules_to_save, both ways, and that the methods with a PEFT
format use it."""

import re

import pytest
from torch import nn

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.delta import HeadCopy
from peftlab.core.peft_format import (
    CLS_HEAD_ENTRY,
    PEFT_CLS_HEADS,
    exclude_to_peft,
    modules_to_save_from_peft,
    modules_to_save_to_peft,
    targets_from_peft,
    targets_to_peft,
)
from peftlab.core.registry import get_method
from peftlab.core.targeting import entry_matches, layer_index

NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
    "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj",
    "model.layers.01.self_attn.q_proj", "model.fc2.layers.1.q_proj", "blocks.2.sub.1.q_proj", "h.1.attn.c_attn", "q_proj", "lm_head",
    "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense",
]


def ours(entries, layers=None):
    """The names peftlab's targeting rule selects (entries, then the layer filter)."""
    return {n for n in NAMES if any(entry_matches(e, n) for e in entries) and (layers is None or layer_index(n) in layers)}


def peft_selects(value, layers=None, bare=False):
    """The names PEFT selects with ``value`` as target_modules (and layers_to_transform)."""
    if isinstance(value, str):
        return {n for n in NAMES if re.fullmatch(value, n)}
    hit = (lambda e, n: n.endswith(e)) if bare else (lambda e, n: n == e or n.endswith("." + e))
    return {n for n in NAMES if any(hit(e, n) for e in value) and (layers is None or layer_index(n) in layers)}


@pytest.mark.parametrize("entries,layers", [
    (["q_proj", "down_proj"], [1]),
    ([r"re:.*\.(q|k)_proj", "down_proj"], [1]),
    ([r"re:.*\.(q|k)_proj"], [0, 11]),
    (["output.dense"], None),
])
@pytest.mark.parametrize("layers_field", [True, False])
def test_targets_with_layers_select_the_same_modules_both_ways(entries, layers, layers_field):
    value = targets_to_peft(entries, layers, layers_field=layers_field)
    plain = not any(e.startswith("re:") for e in entries)
    # A list only when PEFT can say the same with a list (and, for IA3, no layers to fold in).
    assert isinstance(value, list) == (plain and (layers_field or not layers))
    peft_layers = layers if isinstance(value, list) else None  # PEFT refuses layers next to a regex
    assert peft_selects(value, peft_layers) == ours(entries, layers) != set()
    back = targets_from_peft(value)
    assert ours(back, peft_layers) == ours(entries, layers)


def test_layers_lookahead_is_the_first_numeric_part_exactly():
    """The layer is the first all-digit part of the name (``fc2`` is not one; ``01`` is layer 1)."""
    regex = targets_to_peft(["q_proj"], [1], layers_field=False)
    assert peft_selects(regex) == ours(["q_proj"], [1]) == {
        "model.layers.1.self_attn.q_proj", "model.layers.01.self_attn.q_proj", "model.fc2.layers.1.q_proj"}


def test_all_linear_rules():
    assert targets_to_peft(["all-linear"]) == "all-linear"
    assert targets_to_peft(["all-linear"], [1]) == "all-linear"  # layers_to_transform restricts it
    with pytest.raises(ConfigError, match="other entries or layers"):
        targets_to_peft(["all-linear"], [1], layers_field=False)
    with pytest.raises(ConfigError, match="other entries"):
        targets_to_peft(["all-linear", "q_proj"])
    assert targets_from_peft("ALL-LINEAR") == ["all-linear"]
    assert targets_from_peft("all-linear") == ["all-linear"]


def test_none_empty_and_lists_from_peft():
    assert targets_to_peft(None) is None and targets_to_peft([]) == []
    assert exclude_to_peft(None) is None and exclude_to_peft([]) is None
    assert exclude_to_peft(["o_proj"]) == ["o_proj"]
    assert targets_from_peft(None) is None
    assert targets_from_peft(["v_proj", "q_proj", "v_proj"]) == ["q_proj", "v_proj"]  # PEFT's set: sorted, unique
    assert targets_from_peft(r".*\.q_proj") == [r"re:.*\.q_proj"]


def test_bare_suffix_lists_are_regexes_both_ways():
    """IA3's feedforward_modules: PEFT matches a list with a plain ``endswith``."""
    value = targets_to_peft(["proj"], bare_suffix=True)
    assert isinstance(value, str)
    assert peft_selects(value) == ours(["proj"]) == set()  # ours is a dotted suffix: down_proj is not "proj"
    back = targets_from_peft(["proj"], bare_suffix=True)
    assert ours(back) == peft_selects(["proj"], bare=True) != set()
    assert "model.layers.1.mlp.down_proj" in ours(back)
    assert targets_to_peft([], bare_suffix=True) == [] and targets_from_peft([], bare_suffix=True) == []


def test_classification_heads_round_trip():
    written = modules_to_save_to_peft([CLS_HEAD_ENTRY, "pooler", "classifier"])
    assert written == [*PEFT_CLS_HEADS, "pooler"]
    assert modules_to_save_from_peft({"modules_to_save": written, "task_type": "SEQ_CLS"}) == ["pooler", CLS_HEAD_ENTRY]
    assert modules_to_save_from_peft({"modules_to_save": written, "task_type": "TOKEN_CLS"}) == ["pooler", CLS_HEAD_ENTRY]
    # Without the task type, or without both names, the names stay as they are.
    assert modules_to_save_from_peft({"modules_to_save": written}) == written
    assert modules_to_save_from_peft({"modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}) == ["classifier"]
    assert modules_to_save_from_peft({"modules_to_save": []}) is None
    assert modules_to_save_from_peft({}) is None and modules_to_save_to_peft(None) is None


def test_regex_modules_to_save_are_written_as_the_head_copies_they_selected():
    placed = {"heads.a": HeadCopy(nn.Linear(2, 2)), "heads.b": HeadCopy(nn.Linear(2, 2)), "heads.c": nn.Linear(2, 2),
              "other": HeadCopy(nn.Linear(2, 2))}
    assert modules_to_save_to_peft([r"re:heads\..*", "pooler"], placed) == ["heads.a", "heads.b", "pooler"]
    assert modules_to_save_to_peft([r"re:heads\..*"]) == [r"re:heads\..*"]  # no model: as is


PREFIX_GEOMETRY = dict(num_layers=2, token_dim=8, num_attention_heads=2, num_transformer_submodules=1)


@pytest.mark.parametrize("method,cfg,required", [
    ("lora", lambda m: peftlab.LoraConfig(r=4, targets=["q_proj"], modules_to_save=m), {"r": 4}),
    ("ia3", lambda m: get_method("ia3").config_cls(targets=["k_proj"], modules_to_save=m), {}),
    ("prefix", lambda m: get_method("prefix").config_cls(length=4, **PREFIX_GEOMETRY, modules_to_save=m),
     {"num_virtual_tokens": 4}),
])
def test_every_peft_format_uses_the_shared_head_rules(method, cfg, required):
    fmt = get_method(method).peft
    written = fmt.write(cfg([CLS_HEAD_ENTRY, "pooler"]), None)
    assert written["modules_to_save"] == [*PEFT_CLS_HEADS, "pooler"]
    back = fmt.read({**required, "modules_to_save": written["modules_to_save"], "task_type": "SEQ_CLS"})
    assert back.modules_to_save == ["pooler", CLS_HEAD_ENTRY]


def test_ia3_folds_layers_into_the_regex_and_lora_keeps_them():
    ia3 = get_method("ia3").config_cls(targets=["k_proj"], feedforward=[], layers=[1]).to_peft()
    assert isinstance(ia3["target_modules"], str) and "layers_to_transform" not in ia3
    assert peft_selects(ia3["target_modules"]) == ours(["k_proj"], [1]) != set()
    lora = peftlab.LoraConfig(targets=["q_proj"], layers=[1]).to_peft()
    assert (lora["target_modules"], lora["layers_to_transform"]) == (["q_proj"], [1])
    lora_re = peftlab.LoraConfig(targets=[r"re:.*\.q_proj"], layers=[1]).to_peft()
    assert lora_re["layers_to_transform"] is None
    assert peft_selects(lora_re["target_modules"]) == ours([r"re:.*\.q_proj"], [1])
