"""A Hugging Face PEFT user's calls on ``PeftModel``, with PEFT's meaning (issue 8, items 1, 4, 5, 6).

Every call a PEFT user makes on the container (``save_pretrained``, ``from_pretrained``,
``load_adapter``, ``print_trainable_parameters``...), the files PEFT reads back (multi-adapter
layout, ``base_model_name_or_path`` / ``task_type`` for ``AutoPeftModel``, no "Unexpected keyword
arguments" warning), the names that must not fall through to the base model, and PEFT's config
objects given to ``peftlab.apply`` / ``load`` / ``from_pretrained``. PEFT is used here as the
reference; the library never imports it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftlab
from peftlab import NotForwardedError, PeftModel
from peftlab.core import io
from peftlab.core.config import ConfigError
from peftlab.zoo import tiny_model

from conftest import IDS, first_output, randomize_adapter

pytestmark = pytest.mark.usefixtures("threads")


@pytest.fixture(scope="module")
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with ``save_pretrained`` to a local directory (a real base path)."""
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_model("llama", "causal-lm").save_pretrained(path)
    return path


def llama(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(input_ids=ids))


def two_adapters(base) -> PeftModel:
    """'default' (LoRA on q/v) and 'b' (LoRA on k/o, another rank), both moved off their init."""
    pm = peftlab.apply(base, "lora[r=4,alpha=8,targets=q_proj|v_proj]")
    pm.add_adapter("b", "lora[r=2,alpha=4,targets=k_proj|o_proj]")
    randomize_adapter(pm, "default", seed=1)
    randomize_adapter(pm, "b", seed=2)
    return pm


def outputs_per_adapter(pm) -> dict[str, torch.Tensor]:
    out = {}
    for name in pm.adapters:
        pm.set_adapter(name)
        out[name] = logits(pm)
    return out


def files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def unexpected_keyword_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "Unexpected keyword arguments" in str(w.message)]


# -- save_pretrained -----------------------------------------------------------------------------
def test_save_pretrained_writes_adapter_files_only(llama_dir, tmp_path):
    pm = peftlab.apply(llama(llama_dir), "lora[r=4,targets=q_proj|v_proj]")
    pm.save_pretrained(tmp_path)
    assert files(tmp_path) == sorted(io.ADAPTER_FILES)
    tensors = load_file(str(tmp_path / io.WEIGHTS_NAME))
    assert tensors and all(".lora_" in k for k in tensors)
    base_keys = set(pm.model.state_dict())
    assert not base_keys & {k.removeprefix("base_model.model.") for k in tensors}
    base_bytes = sum(p.numel() * p.element_size() for p in pm.model.parameters())
    adapter_bytes = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert adapter_bytes == pm.report()["bytes_on_disk"] and adapter_bytes < base_bytes / 10


def test_save_pretrained_layout_and_selected_adapters(llama_dir, tmp_path):
    pm = two_adapters(llama(llama_dir))
    pm.save_pretrained(tmp_path / "all")
    assert files(tmp_path / "all") == sorted([*io.ADAPTER_FILES, *(f"b/{f}" for f in io.ADAPTER_FILES)])
    assert json.loads((tmp_path / "all" / io.CONFIG_NAME).read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads((tmp_path / "all" / "b" / io.CONFIG_NAME).read_text())["target_modules"] == ["k_proj", "o_proj"]

    pm.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert files(tmp_path / "only_b") == sorted(io.ADAPTER_FILES)
    assert json.loads((tmp_path / "only_b" / io.CONFIG_NAME).read_text())["r"] == 2

    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        pm.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])
    # PEFT's and transformers' keyword arguments are tolerated; the files are the same.
    pm.save_pretrained(tmp_path / "kw", safe_serialization=False, state_dict={}, max_shard_size="1GB",
                       save_embedding_layers=False)
    assert files(tmp_path / "kw") == files(tmp_path / "all")
    pm.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    with pytest.raises(TypeError, match="selected_adapter"):
        pm.save_pretrained(tmp_path / "typo", selected_adapter=["b"])


def test_save_pretrained_without_default_puts_the_first_at_the_root(llama_dir, tmp_path):
    pm = peftlab.apply(llama(llama_dir), "lora[r=4]", adapter_name="sst2")
    pm.add_adapter("mnli", "ia3")
    pm.save_pretrained(tmp_path)
    assert files(tmp_path) == sorted([*io.ADAPTER_FILES, *(f"mnli/{f}" for f in io.ADAPTER_FILES)])
    assert json.loads((tmp_path / io.CONFIG_NAME).read_text())["peft_type"] == "LORA"
    assert json.loads((tmp_path / "mnli" / io.CONFIG_NAME).read_text())["peft_type"] == "IA3"


def test_peft_reads_our_multi_adapter_directory(llama_dir, tmp_path):
    pm = two_adapters(llama(llama_dir))
    ours = outputs_per_adapter(pm)
    pm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(llama_dir), tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.load_adapter(tmp_path, adapter_name="b_again", subfolder="b")
    assert sorted(theirs.peft_config) == ["b", "b_again", "default"]
    for name, expected in [*ours.items(), ("b_again", ours["b"])]:
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(ours["default"], ours["b"])


def test_save_without_a_name_saves_the_active_or_only_adapter(llama_dir, tmp_path):
    pm = peftlab.apply(llama(llama_dir), "lora[r=4]", adapter_name="sst2")
    randomize_adapter(pm, "sst2")
    expected = logits(pm)
    pm.save(tmp_path / "one")  # used to fail with "no adapter named 'default'"
    back = peftlab.load(llama(llama_dir), tmp_path / "one")
    torch.testing.assert_close(logits(back), expected, atol=1e-6, rtol=0)

    pm.add_adapter("other", "ia3")
    pm.save(tmp_path / "active")  # 'sst2' is the active one
    assert json.loads((tmp_path / "active" / io.CONFIG_NAME).read_text())["peft_type"] == "LORA"
    pm.set_adapter(["sst2", "other"])
    with pytest.raises(ValueError, match=r"which adapter\?.*save_pretrained"):
        pm.save(tmp_path / "two")


# -- from_pretrained / load_adapter ----------------------------------------------------------------
def test_from_pretrained_is_frozen_and_in_eval_mode_by_default(llama_dir, tmp_path):
    pm = two_adapters(llama(llama_dir))
    ours = outputs_per_adapter(pm)
    trainable = pm.report("default")["trainable_params"]
    pm.save_pretrained(tmp_path)

    base = llama(llama_dir).train()
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert loaded.adapters == ["default"] and loaded.active_adapter == "default"
    assert not loaded.training and not loaded.model.training
    assert loaded.get_nb_trainable_parameters()[0] == 0
    torch.testing.assert_close(logits(loaded), ours["default"], atol=1e-6, rtol=0)

    # load_adapter: added, frozen, not activated (PEFT's meaning); subfolder= as in PEFT.
    assert loaded.load_adapter(tmp_path, "b", subfolder="b") is None
    assert loaded.adapters == ["default", "b"] and loaded.active_adapters == ["default"]
    assert loaded.get_nb_trainable_parameters()[0] == 0
    loaded.set_adapter("b")  # as in PEFT, activating makes it trainable
    torch.testing.assert_close(logits(loaded), ours["b"], atol=1e-6, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == pm.report("b")["trainable_params"]

    trained = PeftModel.from_pretrained(llama(llama_dir), str(tmp_path), is_trainable=True)
    assert trained.get_nb_trainable_parameters()[0] == trainable
    trained.load_adapter(tmp_path / "b", "b", is_trainable=True)
    assert trained.get_nb_trainable_parameters()[0] == trainable + pm.report("b")["trainable_params"]

    with pytest.raises(peftlab.AdapterFileError, match="snapshot_download"):
        PeftModel.from_pretrained(llama(llama_dir), "some-org/some-adapter")
    with pytest.raises(TypeError, match="adapter_nam"):
        PeftModel.from_pretrained(llama(llama_dir), tmp_path, adapter_nam="x")


def test_from_pretrained_reads_a_directory_peft_wrote(llama_dir, tmp_path):
    theirs = peft.get_peft_model(llama(llama_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapter_peft(theirs)
    theirs.eval()
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(llama(llama_dir), tmp_path)
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)


def randomize_adapter_peft(model, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=gen) * std)


# -- counts, base model, switching -------------------------------------------------------------------
def test_print_trainable_parameters_is_peftlike(llama_dir, capsys):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = peftlab.apply(llama(llama_dir), peft.LoraConfig(**cfg))
    theirs = peft.get_peft_model(llama(llama_dir), peft.LoraConfig(**cfg))
    assert pm.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    pm.print_trainable_parameters()
    ours_line = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert ours_line == capsys.readouterr().out
    trainable, total = pm.get_nb_trainable_parameters()
    assert ours_line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    assert trainable == pm.report()["trainable_params"] > 0


def test_base_model_adapter_switches_and_config(llama_dir):
    base = llama(llama_dir)
    plain = logits(base)
    pm = two_adapters(base)
    assert pm.get_base_model() is base
    assert pm.active_adapter == "default" and pm.active_adapters == ["default"]
    assert set(pm.peft_config) == {"default", "b"} and pm.peft_config["b"].r == 2
    adapted = logits(pm)
    assert not torch.allclose(adapted, plain)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm), plain, atol=0, rtol=0)
    with pm.disable_adapters():
        torch.testing.assert_close(logits(pm), plain, atol=0, rtol=0)
    torch.testing.assert_close(logits(pm), adapted, atol=0, rtol=0)
    pm.disable_adapter_layers()
    torch.testing.assert_close(logits(pm), plain, atol=0, rtol=0)
    pm.enable_adapter_layers()
    torch.testing.assert_close(logits(pm), adapted, atol=0, rtol=0)
    pm.set_adapter("b", inference_mode=True)
    assert pm.active_adapter == "b" and pm.get_nb_trainable_parameters()[0] == 0


# -- names that must not fall through to the base model ----------------------------------------------
@pytest.mark.parametrize("name", sorted(peftlab.core.model.NOT_FORWARDED))
def test_denied_names_raise_instead_of_reaching_the_base(llama_dir, name):
    pm = peftlab.apply(llama(llama_dir), "lora[r=2]")
    assert hasattr(pm.model, name) or name == "save_model"  # the base (or a Trainer) has these
    with pytest.raises(NotForwardedError, match=rf"PeftModel\.{name}: .*pm\.") as err:
        getattr(pm, name)("anything")
    assert isinstance(err.value, AttributeError) and isinstance(err.value, NotImplementedError)
    assert not hasattr(pm, name)


def test_push_to_hub_says_to_save_pretrained_and_upload(llama_dir, tmp_path):
    pm = peftlab.apply(llama(llama_dir), "lora[r=2]")
    with pytest.raises(NotImplementedError, match=r"save_pretrained\(directory\) and upload that directory"):
        pm.push_to_hub("me/my-adapter")
    with pytest.raises(NotImplementedError, match="does not upload"):
        pm.save_pretrained(tmp_path, push_to_hub=True)
    assert not list(tmp_path.iterdir())
    # Other names still reach the base model, and PEFT's names are the container's own.
    assert pm.config is pm.model.config and pm.get_input_embeddings() is pm.model.get_input_embeddings()
    for own in ("save_pretrained", "from_pretrained", "load_adapter", "add_adapter", "set_adapter"):
        assert getattr(type(pm), own).__qualname__.startswith("PeftModel."), own


# -- files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,task,expected",
    [
        ("llama", "causal-lm", "CAUSAL_LM"),
        ("gpt2", "causal-lm", "CAUSAL_LM"),
        ("t5", "seq2seq", "SEQ_2_SEQ_LM"),
        ("bert", "base", "FEATURE_EXTRACTION"),
        ("vit", "base", "FEATURE_EXTRACTION"),
        ("bert", "classification", "SEQ_CLS"),
        ("vit", "classification", None),
    ],
)
def test_task_type_from_the_base_class(kind, task, expected):
    assert io.task_type_of(tiny_model(kind, task)) == expected


def test_files_carry_base_path_and_task_type(llama_dir, tmp_path):
    pm = peftlab.apply(llama(llama_dir), "lora[r=2]")
    pm.save(tmp_path / "saved_base")
    raw = json.loads((tmp_path / "saved_base" / io.CONFIG_NAME).read_text())
    assert raw["base_model_name_or_path"] == str(llama_dir) and raw["task_type"] == "CAUSAL_LM"
    assert "auto_mapping" not in raw and "peftlab" not in raw

    built = peftlab.apply(tiny_model("llama", "causal-lm"), "lora[r=2]")  # built from a config: no path
    built.save(tmp_path / "no_path")
    assert json.loads((tmp_path / "no_path" / io.CONFIG_NAME).read_text())["base_model_name_or_path"] is None

    # A classifier whose head is not saved: PEFT's SEQ_CLS class would need the head's weights, so
    # the task type stays null and auto_mapping names the class; with the head saved, SEQ_CLS.
    for heads, task in ((None, None), (["classifier"], "SEQ_CLS")):
        cls_pm = peftlab.apply(tiny_model("bert", "classification"), "lora[r=2]", modules_to_save=heads)
        cls_pm.save(tmp_path / str(task))
        raw = json.loads((tmp_path / str(task) / io.CONFIG_NAME).read_text())
        assert raw["task_type"] == task
        assert (raw.get("auto_mapping") or {}).get("base_model_class") == (None if task else "BertForSequenceClassification")
        assert cls_pm.report()["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / str(task)).iterdir())
        peft.PeftModel.from_pretrained(tiny_model("bert", "classification"), tmp_path / str(task))


def test_auto_peft_model_loads_our_lora(llama_dir, tmp_path):
    pm = peftlab.apply(llama(llama_dir), "lora[r=4,alpha=8,targets=q_proj|v_proj|down_proj]")
    randomize_adapter(pm)
    expected = logits(pm)
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert not unexpected_keyword_warnings(caught)
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(logits(theirs.eval()), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["lora[r=2]", "dora[r=2]", "lora_fa[r=2]", "ia3", "prefix[length=3]"])
def test_peft_reads_our_files_without_warning(llama_dir, tmp_path, spec):
    pm = peftlab.apply(llama(llama_dir), spec)
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = peft.PeftConfig.from_pretrained(str(tmp_path))
        peft.PeftModel.from_pretrained(llama(llama_dir), tmp_path)
    assert not unexpected_keyword_warnings(caught), unexpected_keyword_warnings(caught)
    assert config.base_model_name_or_path == str(llama_dir)
    # ... and our own reader gives back the exact config.
    assert peftlab.load(llama(llama_dir), tmp_path).configs["default"] == pm.configs["default"]


def test_our_block_is_read_first_and_old_files_still_load(llama_dir, tmp_path):
    # PEFT's fields cannot say "all-linear in layer 0" (written as the resolved names).
    cfg = peftlab.LoraConfig(r=2, targets=["all-linear"], layers=[0])
    pm = peftlab.apply(llama(llama_dir), cfg)
    randomize_adapter(pm)
    expected = logits(pm)
    pm.save(tmp_path / "new")
    assert peftlab.load(llama(llama_dir), tmp_path / "new").configs["default"] == cfg

    # A file written before peftlab_config.json: the block inside adapter_config.json.
    old = tmp_path / "old"
    old.mkdir()
    raw = json.loads((tmp_path / "new" / io.CONFIG_NAME).read_text())
    raw["peftlab"] = json.loads((tmp_path / "new" / io.PEFTLAB_CONFIG_NAME).read_text())["peftlab"]
    (old / io.CONFIG_NAME).write_text(json.dumps(raw))
    (old / io.WEIGHTS_NAME).write_bytes((tmp_path / "new" / io.WEIGHTS_NAME).read_bytes())
    back = peftlab.load(llama(llama_dir), old)
    assert back.configs["default"] == cfg
    torch.testing.assert_close(logits(back), expected, atol=1e-6, rtol=0)

    # adapter_config.json rewritten since (PEFT saved into the directory): PEFT's fields win, warned.
    raw = json.loads((tmp_path / "new" / io.CONFIG_NAME).read_text())
    raw["lora_alpha"] = 4
    (tmp_path / "new" / io.CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="rewritten after peftlab_config.json"):
        again = peftlab.load(llama(llama_dir), tmp_path / "new")
    assert again.configs["default"].alpha == 4 and again.configs["default"].targets != ["all-linear"]


# -- config strings ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        "lora",
        "ia3",
        "prefix[length=3]",
        "lora[r=4]+ia3",
        peftlab.LoraConfig(targets=[r"re:.*\.(q|k)_proj"], exclude=[]),
        peftlab.LoraConfig(targets=[r"re:.*layers\.[0-1]\.self_attn\.[qv]_.{1,4}"], alpha=16.0, dropout=0.1),
    ],
)
def test_report_method_round_trips_through_the_string_grammar(llama_dir, spec):
    pm = peftlab.apply(llama(llama_dir), spec)
    method = pm.report()["method"]
    assert "[]" not in method
    assert peftlab.parse_method_string(method) == pm.configs["default"]


def test_plain_names_are_written_bare():
    assert peftlab.LoraConfig().to_string() == "lora"
    assert peftlab.parse_method_string("lora") == peftlab.parse_method_string("lora[]") == peftlab.LoraConfig()


# -- PEFT's config objects -------------------------------------------------------------------------
def peft_adapter_keys(model, config, tmp_path) -> list[str]:
    theirs = peft.get_peft_model(model, config)
    theirs.save_pretrained(tmp_path)
    return sorted(load_file(str(tmp_path / io.WEIGHTS_NAME)))


@pytest.mark.parametrize(
    "make,method",
    [
        (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "lora"),
        (lambda: peft.LoraConfig(r=4, use_dora=True), "dora"),
        (lambda: peft.IA3Config(), "ia3"),
        (lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "ia3"),
    ],
)
def test_apply_accepts_peft_configs(llama_dir, tmp_path, make, method):
    pm = peftlab.apply(llama(llama_dir), make())
    assert pm.configs["default"].method == method
    assert sorted(pm.adapter_tensors()) == peft_adapter_keys(llama(llama_dir), make(), tmp_path)


def test_prefix_tuning_config_and_classifier_task(llama_dir):
    pm = peftlab.apply(llama(llama_dir), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    cfg = pm.configs["default"]
    assert (cfg.method, cfg.length, cfg.task_type, cfg.num_layers) == ("prefix", 3, "CAUSAL_LM", 2)
    # task_type SEQ_CLS gives the head a trainable copy, as PEFT's wrapper does.
    cls = peftlab.apply(tiny_model("bert", "classification"), peft.LoraConfig(r=2, task_type="SEQ_CLS"))
    assert "classifier" in cls.placed("default")
    # A PEFT type no registered method reads (HRA is not implemented yet) names what is read.
    with pytest.raises(ConfigError, match=r"HRAConfig \(PEFT type 'HRA'\) is not supported.*LORA"):
        peftlab.apply(llama(llama_dir), peft.HRAConfig(r=2))


def test_load_and_from_pretrained_take_a_peft_config(llama_dir, tmp_path):
    pm = peftlab.apply(llama(llama_dir), "lora[r=4,alpha=8,targets=q_proj|v_proj]")
    randomize_adapter(pm)
    pm.save(tmp_path)
    doubled = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    a = peftlab.load(llama(llama_dir), tmp_path, config=doubled)
    b = PeftModel.from_pretrained(llama(llama_dir), tmp_path, config=doubled)
    assert a.configs["default"].alpha == b.configs["default"].alpha == 16
    torch.testing.assert_close(logits(a), logits(b), atol=0, rtol=0)
    assert not torch.allclose(logits(a), logits(pm))


# -- one real model ----------------------------------------------------------------------------------
def test_minilm_classifier_round_trips_through_peft(tmp_path):
    def minilm():
        model, _ = peftlab.zoo.load("minilm", task="classification", num_labels=2)
        return model.eval()

    config = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    pm = peftlab.apply(minilm(), peft.LoraConfig(**config))
    theirs = peft.get_peft_model(minilm(), peft.LoraConfig(**config))
    assert pm.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomize_adapter(pm)
    ids = torch.randint(1000, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = logits(pm, ids)
    pm.save_pretrained(tmp_path)

    raw = json.loads((tmp_path / io.CONFIG_NAME).read_text())
    assert raw["task_type"] == "SEQ_CLS" and raw["base_model_name_or_path"] == pm.model.name_or_path
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) == pm.report()["bytes_on_disk"] < 1_000_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert not unexpected_keyword_warnings(caught)
    torch.testing.assert_close(logits(back.eval(), ids), expected, atol=1e-5, rtol=0)
