"""Configs, the string grammar, targeting, and bad input: every error names what was wrong and
what would be right, and the user's model is left exactly as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import peftlab
from peftlab.core.config import UnionConfig, parse_method_string
from peftlab.core.targeting import select_modules

from conftest import first_output, randomize_adapter


def test_string_grammar_parses_types_and_lists():
    cfg = parse_method_string("lora[r=8,alpha=16,dropout=0.05,rslora=true,init=pissa,targets=q_proj|v_proj,layers=0|1]")
    assert isinstance(cfg, peftlab.LoraConfig)
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.init) == (8, 16, 0.05, True, "pissa")
    assert cfg.targets == ["q_proj", "v_proj"] and cfg.layers == [0, 1]
    assert parse_method_string("lora[targets=query]").targets == ["query"]
    assert parse_method_string(r"lora[targets=re:.*\.(q|v)_proj]").targets == [r"re:.*\.(q|v)_proj"]
    assert parse_method_string("dora[r=8,alpha=16,targets=q_proj|v_proj]").method == "dora"


def test_union_grammar():
    cfg = parse_method_string("lora[r=4]+dora[r=2,targets=o_proj]")
    assert isinstance(cfg, UnionConfig) and [p.method for p in cfg.parts] == ["lora", "dora"]
    assert parse_method_string(cfg.to_string()).to_dict() == cfg.to_dict()


def test_config_json_round_trip():
    cfg = peftlab.LoraConfig(r=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"], exclude=["layers.1.self_attn.q_proj"])
    again = peftlab.core.config.config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg


@pytest.mark.parametrize(
    "spec, field",
    [("lora[rank=8]", "rank"), ("lora[r=0]", "r"), ("lora[dropout=1.5]", "dropout"), ("lora[init=xavier]", "init")],
)
def test_wrong_field_names_the_field(spec, field):
    with pytest.raises(peftlab.ConfigError, match=field) as e:
        parse_method_string(spec)
    if spec == "lora[rank=8]":
        assert "Valid fields" in str(e.value) and "'r'" in str(e.value)


def test_wrong_field_in_config_object():
    with pytest.raises(TypeError, match="rank"):
        peftlab.LoraConfig(rank=8)
    with pytest.raises(peftlab.ConfigError, match="alpha"):
        peftlab.LoraConfig(alpha=-1)


def test_unknown_method_lists_registered():
    with pytest.raises(peftlab.ConfigError, match="Registered: .*lora"):
        parse_method_string("lorra[r=8]")


def test_unknown_target_lists_nearest_modules(tiny):
    model, _ = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.TargetError, match="q_proj") as e:
        peftlab.apply(model, "lora[targets=q_prj]")
    assert "Nearest module names" in str(e.value)
    assert all(p.requires_grad for p in model.parameters()), "a failed apply leaves the model as it was"
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_targeting_rules(tiny):
    model, _ = tiny("llama")
    names = lambda **kw: list(select_modules(model, peftlab.LoraConfig(**kw)))  # noqa: E731
    assert names(targets=["model.layers.0.self_attn.q_proj"]) == ["model.layers.0.self_attn.q_proj"]
    assert names(targets=["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert names(targets=[r"re:.*layers\.1\..*_proj"]) == [
        n for n, _ in model.named_modules() if n.startswith("model.layers.1.") and n.endswith("_proj")
    ]
    all_linear = names(targets=["all-linear"])
    assert len(all_linear) == 2 * 7 and "lm_head" not in all_linear
    assert names(targets=["q_proj", "v_proj"], layers=[1]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert names(targets=["all-linear"], exclude=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]) == [
        n for n in all_linear if ".mlp." not in n
    ]
    assert names(targets=["all-linear"], module_types=["Linear"]) == all_linear
    with pytest.raises(peftlab.TargetError, match="select no"):
        names(targets=["q_proj"], layers=[7])


def test_duplicate_adapter_name_refused(tiny):
    model, _ = tiny("llama")
    pm = peftlab.apply(model, "lora[r=2]")
    with pytest.raises(ValueError, match="exists already"):
        pm.add_adapter("default", "lora[r=4]")
    assert pm.adapters == ["default"]


def _saved(tmp_path, tiny, spec="lora[r=4]"):
    model, batch = tiny("llama")
    pm = peftlab.apply(model, spec)
    randomize_adapter(pm)
    pm.save(tmp_path / "a")
    return tmp_path / "a"


def _untouched(model, before):
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_missing_directory(tmp_path, tiny):
    model, _ = tiny("llama")
    with pytest.raises(peftlab.AdapterFileError, match="does not exist"):
        peftlab.load(model, tmp_path / "nope")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_weights", "bad_json"])
def test_corrupt_files_refused_model_untouched(tmp_path, tiny, damage):
    path = _saved(tmp_path, tiny)
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 100)
    elif damage == "no_weights":
        weights.unlink()
    else:
        config.write_text("{not json")
    model, _ = tiny("llama", seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.AdapterFileError) as e:
        peftlab.load(model, path)
    assert str(path) in str(e.value)
    _untouched(model, before)


def test_adapter_for_another_base_refused(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    other, _ = tiny("bert")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises((peftlab.AdapterFileError, peftlab.TargetError)):
        peftlab.load(other, path)
    _untouched(other, before)


def test_shape_mismatch_names_the_key(tmp_path, tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = _saved(tmp_path, tiny)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(peftlab.AdapterFileError, match=r"lora_A\.weight has shape .* another base"):
        peftlab.load(wider, path)
    _untouched(wider, before)


def test_load_into_existing_peft_model_keeps_it_intact_on_error(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"junk")
    model, batch = tiny("llama")
    pm = peftlab.apply(model, "lora[r=2]", adapter_name="mine")
    randomize_adapter(pm, "mine")
    expected = first_output(pm(**batch))
    with pytest.raises(peftlab.AdapterFileError):
        peftlab.load(pm, broken, adapter_name="other")
    assert pm.adapters == ["mine"]
    torch.testing.assert_close(first_output(pm(**batch)), expected)
    with pytest.raises(ValueError, match="exists already"):
        peftlab.load(pm, path, adapter_name="mine")
    loaded = peftlab.load(pm, path, adapter_name="other")
    assert loaded is pm and pm.adapters == ["mine", "other"] and pm.active_adapters == ["mine"]


def test_save_is_atomic_and_overwrites(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "peftlab_config.json"]


def test_list_methods_and_api_names():
    methods = peftlab.list_methods()
    assert {"lora", "dora", "lora_fa"} <= set(methods) and methods == sorted(methods)
    for name in ["apply", "load", "LoraConfig", "list_methods", "param_groups", "zoo"]:
        assert hasattr(peftlab, name)


def test_second_container_on_an_adapted_model_is_refused(tiny, tmp_path):
    """apply() on a model that another PeftModel already hooks would stack hooks and change the
    first container's outputs; it is refused, and the first container is unaffected."""
    model, batch = tiny("llama")
    first = peftlab.apply(model, "lora[r=4]")
    randomize_adapter(first)
    with torch.no_grad():
        before = first_output(first(**batch)).clone()
    with pytest.raises(ValueError, match=r"already carries adapters \['default'\].*add_adapter"):
        peftlab.apply(model, "ia3", adapter_name="other")
    first.save(tmp_path)
    with pytest.raises(ValueError, match="add_adapter"):
        peftlab.load(model, tmp_path, adapter_name="again")
    with torch.no_grad():
        torch.testing.assert_close(first_output(first(**batch)), before, atol=0, rtol=0)
    # After unload() the plain model takes a new container again.
    plain = first.unload()
    second = peftlab.apply(plain, "ia3")
    assert second.adapters == ["default"]


# -- issue 8, item 8: small error messages, adapter_names length, py.typed ----------------------------

def _nearest_names(message: str) -> list[str]:
    return [n.strip() for n in message.split("Nearest module names:")[1].split(",")]


@pytest.mark.parametrize("field", ["targets", "modules_to_save"])
def test_nearest_module_hint_lists_each_name_once(tiny, field):
    model, _ = tiny("bert", task="classification")
    spec = "lora[targets=clasifier]" if field == "targets" else "lora[targets=query,modules_to_save=clasifier]"
    with pytest.raises(peftlab.TargetError) as e:
        peftlab.apply(model, spec)
    names = _nearest_names(str(e.value))
    assert names[0] == "classifier" and len(names) == len(set(names)), names


@pytest.mark.parametrize("spec", ["LoRA[r=8]", "Lora[r=8]", "LORA"])
def test_method_name_in_the_wrong_case_suggests_the_registered_one(spec):
    with pytest.raises(peftlab.ConfigError, match=r"Did you mean lora\b"):
        parse_method_string(spec)
    with pytest.raises(peftlab.ConfigError, match=r"Did you mean ia3\b"):
        peftlab.get_method("IA3")


def test_adapter_names_of_the_wrong_length_refused_before_any_layer_runs(tiny):
    model, batch = tiny("llama")  # batch of 3 rows
    pm = peftlab.apply(model, "lora[r=4,targets=q_proj]")
    calls = []
    model.get_submodule("model.embed_tokens").register_forward_pre_hook(lambda *a: calls.append(1))
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match=r"adapter_names has 2 entries but the batch has 3 rows \(input_ids has shape \(3, 8\)\)"):
        pm(**batch, adapter_names=["default", None])
    with pytest.raises(ValueError, match=r"4 entries but the batch has 3 rows \(positional argument 0"):
        pm(ids, adapter_names=["default"] * 4)
    embeds = model.get_input_embeddings()(ids).detach()
    calls.clear()
    with pytest.raises(ValueError, match=r"1 entries but the batch has 3 rows \(inputs_embeds"):
        pm(inputs_embeds=embeds, adapter_names=["default"])
    with pytest.raises(ValueError, match="2 entries but the batch has 3 rows"):
        pm.generate(ids, max_new_tokens=1, adapter_names=["default", None])
    with pytest.raises(TypeError, match="one adapter name per row"):
        pm(**batch, adapter_names="default")
    assert calls == []  # refused at the container: no layer ran
    with torch.no_grad():
        out = first_output(pm(**batch, adapter_names=["default", None, "default"]))
    assert out.shape[0] == 3


def test_adapter_names_length_read_from_pixel_values(tiny):
    model, batch = tiny("vit")
    pm = peftlab.apply(model, "lora[r=4,targets=q_proj]")
    with pytest.raises(ValueError, match=r"the batch has 3 rows \(pixel_values has shape \(3, "):
        pm(**batch, adapter_names=["default"])


def test_package_ships_py_typed():
    import tomllib
    from pathlib import Path

    root = Path(peftlab.__file__).resolve().parent
    assert (root / "py.typed").is_file()
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["peftlab"]
