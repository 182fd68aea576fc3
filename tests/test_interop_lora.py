"""LoRA-family files interoperate with Hugging Face PEFT (DESIGN.md principle 5).

For LoRA, rsLoRA, DoRA and the init options (gaussian, PiSSA, OLoRA), on tiny random Llama, BERT
and GPT-2 models:

- direction 1: ``peftlab.apply`` → train (random noise) → ``pm.save`` → ``peft.PeftModel.from_pretrained``;
- direction 2: ``peft.get_peft_model`` → train → ``save_pretrained`` → ``peftlab.load``;

and the outputs agree to 1e-5. Our files carry the same tensor keys and the same key config fields
as PEFT's for the same config. PEFT is a dev dependency of these tests only.

Mixed batches (one adapter per row) are checked row by row against single-adapter runs, for their
gradients, and against PEFT's own ``adapter_names=`` mixed batches.

PEFT behaviours these tests rely on or document:
- PiSSA / OLoRA: PEFT rewrites the base weight to W0 − s·B0A0 when the adapter is created, and
  ``from_pretrained`` runs the same init on the base it is given, so a PiSSA/OLoRA adapter loaded
  onto the *original* base reproduces the training-time model. peftlab keeps W0 and subtracts
  s·B0A0 in the forward instead; both give the same function.
- PEFT's OLoRA init ignores ``fan_in_fan_out``: on GPT-2's ``Conv1D`` it factors the stored
  (in, out) weight, so lora_A/lora_B get transposed shapes (c_attn: load fails) or the residual is
  wrong (square c_proj). That case is marked xfail below.
- PEFT warns about any config key its class lacks ("Unexpected keyword arguments [...] ... upgrade
  PEFT"), so our own config lives in ``peftlab_config.json`` beside ``adapter_config.json``.
- ``task_type="SEQ_CLS"`` makes PEFT write ``modules_to_save=["classifier", "score"]`` whichever of
  the two the model has.
- When ``embed_tokens`` (or ``lm_head``) is targeted, PEFT's ``save_pretrained`` also saves the full
  base embedding under ``<module>.base_layer.weight`` (``save_embedding_layers="auto"``).
- PEFT saves ``"all-linear"`` (and default targets) resolved to module names; it refuses
  ``layers_to_transform`` with a regex (str) ``target_modules``; on a ``Conv1D`` with
  ``fan_in_fan_out=False`` it warns and switches it on.
- PEFT refuses DoRA adapters in ``adapter_names=`` mixed batches, and after any error inside such a
  call its ``adapter_names`` hooks stay registered (no ``finally``), breaking later calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.core import io
from peftlab.methods.reparam.lora import DoraConfig, LoraConfig

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

TOL = 1e-5


# -- tiny models ----------------------------------------------------------------------------------
def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def _bert_config(**kw):
    return transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, **kw,
    )


def _bert():
    return transformers.BertModel(_bert_config())


def _bert_cls():
    return transformers.BertForSequenceClassification(_bert_config(num_labels=3))


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


@dataclass(frozen=True)
class Spec:
    build: Callable[[], torch.nn.Module]
    qv: list[str]  # q/v-style targets
    emb: str  # the input embedding
    regex: str  # a regex selecting the q/v-style modules
    several: list[str]  # more targets, for the exclude/layers variant
    exclude: str  # one of their full names (in layer 1) to exclude
    fan_in_fan_out: bool = False


MODELS = {
    "llama": Spec(
        _llama, ["q_proj", "v_proj"], "embed_tokens", r".*\.self_attn\.(q_proj|v_proj)",
        ["q_proj", "v_proj", "o_proj", "down_proj"], "model.layers.1.self_attn.o_proj",
    ),
    "bert": Spec(
        _bert, ["query", "value"], "word_embeddings", r".*\.self\.(query|value)",
        ["query", "value", "dense"], "encoder.layer.1.attention.output.dense",
    ),
    "bert_cls": Spec(
        _bert_cls, ["query", "value"], "word_embeddings", r".*\.self\.(query|value)",
        ["query", "value", "dense"], "bert.encoder.layer.1.attention.output.dense",
    ),
    "gpt2": Spec(
        _gpt2, ["c_attn"], "wte", r".*\.attn\.c_attn", ["c_attn", "c_proj", "c_fc"],
        "transformer.h.1.mlp.c_proj", fan_in_fan_out=True,
    ),
}


def fresh(kind: str) -> torch.nn.Module:
    """The same random model every call (seeded before construction), in eval mode."""
    torch.manual_seed(1234)
    return MODELS[kind].build().eval()


def inputs(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 128, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # one left-padded row
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind.startswith("bert"):
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kw: Any) -> list[torch.Tensor]:
    """Every floating tensor of the model's output (logits; last hidden state and pooler output)."""
    with torch.no_grad():
        out = model(**batch, **kw)
    return [v for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = TOL) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        diff = (x - y).abs().max().item()
        assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"


def randomize(params, seed: int = 0, std: float = 0.1) -> None:
    """Move trained parameters away from their init (B ≠ 0, DoRA magnitudes ≠ ‖W‖)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def our_trainable(pm, adapter: str = "default"):
    return [p for _, p in sorted(pm.adapter_modules[adapter].named_parameters()) if p.requires_grad]


def peft_trainable(model):
    return [p for _, p in sorted(model.named_parameters()) if p.requires_grad]


# -- variants: (our config, PEFT's LoraConfig kwargs for the same adapter) ---------------------------
def _variant(name: str, kind: str) -> tuple[LoraConfig, dict[str, Any]]:
    s = MODELS[kind]
    ours: dict[str, Any] = {"r": 4, "alpha": 8, "targets": s.qv}
    # GPT-2's Conv1D stores (in, out): PEFT needs fan_in_fan_out=True there (not for its embedding).
    theirs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": s.qv, "fan_in_fan_out": s.fan_in_fan_out}
    cls = LoraConfig
    if name == "rslora":
        ours["rslora"] = theirs["use_rslora"] = True
    elif name == "dora":
        cls, theirs["use_dora"] = DoraConfig, True
    elif name in ("gaussian", "pissa", "olora"):
        ours["init"] = theirs["init_lora_weights"] = name
    elif name == "default_targets":
        ours["targets"] = theirs["target_modules"] = None
    elif name == "all_linear":
        ours["targets"], theirs["target_modules"] = ["all-linear"], "all-linear"
    elif name == "embedding":
        ours["targets"] = theirs["target_modules"] = [s.emb]
        theirs["fan_in_fan_out"] = False
    elif name == "modules_to_save":
        ours["modules_to_save"] = theirs["modules_to_save"] = ["classifier"]
    elif name == "dropout":
        ours["dropout"] = theirs["lora_dropout"] = 0.1
    elif name == "exclude_layers":
        ours["targets"] = theirs["target_modules"] = s.several
        ours["layers"] = theirs["layers_to_transform"] = [1]
        ours["exclude"] = theirs["exclude_modules"] = [s.exclude]
    elif name == "regex_exclude":
        ours["targets"], theirs["target_modules"] = ["re:" + s.regex], s.regex
        ours["exclude"], theirs["exclude_modules"] = [r"re:.*\.0\..*"], r".*\.0\..*"
    elif name == "regex_layers":
        # PEFT refuses layers_to_transform with a regex target: its side spells the layer in the regex.
        ours["targets"], ours["layers"] = ["re:" + s.regex], [1]
        theirs["target_modules"] = s.regex.replace(r".*\.", r".*\.1\..*", 1)
    else:
        assert name == "lora", name
    return cls(**ours), theirs


VARIANTS = [
    "lora", "rslora", "dora", "gaussian", "pissa", "olora", "all_linear", "embedding", "dropout",
    "exclude_layers", "regex_exclude", "regex_layers", "default_targets",
]
OLORA_GPT2 = pytest.mark.xfail(
    reason="PEFT's olora_init ignores fan_in_fan_out: it factors Conv1D's stored (in, out) weight, so the "
    "factors are transposed (c_attn: shape mismatch) -- a PEFT bug, peftlab factors the (out, in) weight",
    strict=True,
)


def _cases(test: str):
    for kind, v in [(k, v) for k in ("llama", "bert", "gpt2") for v in VARIANTS] + [("bert_cls", "modules_to_save")]:
        marks = []
        if (kind, v) == ("gpt2", "olora"):
            marks.append(OLORA_GPT2)
        yield pytest.param(kind, v, id=f"{kind}-{v}", marks=marks)


# -- direction 1: peftlab -> PEFT -------------------------------------------------------------------
@pytest.mark.parametrize("kind,variant", list(_cases("ours_to_peft")))
def test_peftlab_adapter_loads_in_peft(kind, variant, tmp_path):
    cfg, _ = _variant(variant, kind)
    batch = inputs(kind)
    pm = peftlab.apply(fresh(kind), cfg)
    randomize(our_trainable(pm))
    pm.eval()
    ours = outputs(pm, batch)
    pm.save(tmp_path)
    theirs_model = peft.PeftModel.from_pretrained(fresh(kind), tmp_path).eval()
    assert_same(ours, outputs(theirs_model, batch))
    # The adapter does something (so the comparison is not vacuous).
    with pm.disable_adapters():
        base = outputs(pm, batch)
    assert max((a - b).abs().max().item() for a, b in zip(ours, base)) > 1e-3


# -- direction 2: PEFT -> peftlab -------------------------------------------------------------------
@pytest.mark.parametrize("kind,variant", list(_cases("peft_to_ours")))
def test_peft_adapter_loads_in_peftlab(kind, variant, tmp_path):
    _, kw = _variant(variant, kind)
    batch = inputs(kind)
    theirs_model = peft.get_peft_model(fresh(kind), peft.LoraConfig(**kw))
    randomize(peft_trainable(theirs_model))
    theirs_model.eval()
    theirs = outputs(theirs_model, batch)
    theirs_model.save_pretrained(tmp_path)
    pm = peftlab.load(fresh(kind), tmp_path)
    pm.eval()
    assert_same(outputs(pm, batch), theirs)


def test_peft_seq_cls_adapter_loads_in_peftlab(tmp_path):
    """task_type=SEQ_CLS: PEFT saves modules_to_save=["classifier", "score"] (BERT has no "score")."""
    batch = inputs("bert_cls")
    theirs_model = peft.get_peft_model(
        fresh("bert_cls"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    randomize(peft_trainable(theirs_model))
    theirs_model.eval()
    theirs = outputs(theirs_model, batch)
    theirs_model.save_pretrained(tmp_path)
    assert sorted(json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]) == ["classifier", "score"]
    pm = peftlab.load(fresh("bert_cls"), tmp_path)
    assert_same(outputs(pm, batch), theirs)
    # Saved again by peftlab, it still loads in PEFT (as SEQ_CLS or as a plain PeftModel).
    pm.save(tmp_path / "again")
    again = peft.PeftModel.from_pretrained(fresh("bert_cls"), tmp_path / "again").eval()
    assert_same(outputs(again, batch), theirs)


# -- same files for the same config ------------------------------------------------------------------
_KEY_FIELDS = [
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "bias",
    "target_modules", "exclude_modules", "layers_to_transform", "modules_to_save", "fan_in_fan_out",
]


def _as_set(v):
    return sorted(v) if isinstance(v, (list, tuple, set)) else v


@pytest.mark.parametrize("kind,variant", list(_cases("format")))
def test_file_format_equals_peft(kind, variant, tmp_path):
    cfg, kw = _variant(variant, kind)
    pm = peftlab.apply(fresh(kind), cfg)
    pm.save(tmp_path / "ours")
    theirs_model = peft.get_peft_model(fresh(kind), peft.LoraConfig(**kw))
    theirs_model.save_pretrained(tmp_path / "theirs")

    ours_t = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_t = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    # PEFT also stores a copy of a targeted embed_tokens' base weight; we never change the base.
    theirs_t = {k: v for k, v in theirs_t.items() if ".base_layer." not in k}
    assert {k: tuple(v.shape) for k, v in ours_t.items()} == {k: tuple(v.shape) for k, v in theirs_t.items()}
    assert all(v.dtype == theirs_t[k].dtype for k, v in ours_t.items())

    ours_c = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_c = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert "peftlab" not in ours_c  # our own config is in peftlab_config.json
    fields = list(_KEY_FIELDS)
    if variant in ("regex_layers", "regex_exclude"):
        # Spelled differently, same modules (checked by the tensor keys above): PEFT cannot take
        # layers_to_transform with a regex, so both sides write their own regex.
        fields = [f for f in fields if f not in ("target_modules", "exclude_modules", "layers_to_transform")]
    differ = {f: (ours_c.get(f), theirs_c.get(f)) for f in fields if _as_set(ours_c.get(f)) != _as_set(theirs_c.get(f))}
    assert not differ, differ


# -- config details ---------------------------------------------------------------------------------
def test_peft_reads_our_config_without_warning(tmp_path):
    pm = peftlab.apply(fresh("llama"), LoraConfig(r=4, alpha=8, targets=["q_proj"]))
    pm.save(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "peftlab" not in raw
    assert json.loads((tmp_path / "peftlab_config.json").read_text())["peftlab"]["method"] == "lora"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, peft.LoraConfig) and loaded.r == 4
    # PEFT warns about keys its config class lacks; we write none.
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(
            LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj"], exclude=["model.layers.1.self_attn.o_proj"], layers=[1]),
            id="list-exclude-layers",
        ),
        pytest.param(LoraConfig(r=4, alpha=8, targets=[r"re:.*\.(q|k)_proj"], exclude=[r"re:.*\.0\..*"]), id="regex-exclude"),
        pytest.param(LoraConfig(r=4, alpha=8, targets=[r"re:.*\.(q|k)_proj", "down_proj"], layers=[1]), id="regex-and-name-layers"),
        pytest.param(
            DoraConfig(r=2, alpha=4, targets=["all-linear"], exclude=["o_proj"], rslora=True, init="gaussian"),
            id="all-linear-exclude",
        ),
        # PEFT has no field for these: written as the resolved module names.
        pytest.param(LoraConfig(r=4, alpha=8, targets=["all-linear"], layers=[0]), id="all-linear-layers"),
        pytest.param(LoraConfig(r=4, alpha=8, targets=["q_proj", "embed_tokens"], module_types=["Linear"]), id="module-types"),
    ],
)
def test_targeting_round_trips_both_ways(cfg, tmp_path):
    """The modules PEFT adapts from our file equal ours; and reading that config back (PEFT's fields
    only) selects the same modules again."""
    pm = peftlab.apply(fresh("llama"), cfg)
    ours = sorted(pm.adapter_tensors())
    pm.save(tmp_path)
    theirs_model = peft.PeftModel.from_pretrained(fresh("llama"), tmp_path)
    theirs_model.save_pretrained(tmp_path / "peft")
    assert sorted(load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) == ours
    # PEFT's own file (no "peftlab" key) read by peftlab: same modules, same config fields.
    back = peftlab.load(fresh("llama"), tmp_path / "peft")
    assert sorted(back.adapter_tensors()) == ours
    again = back.configs["default"]
    assert (again.method, again.r, again.alpha, again.rslora, again.init) == (cfg.method, cfg.r, cfg.alpha, cfg.rslora, cfg.init)
    # Our own file (with the "peftlab" key) gives back the config exactly.
    assert peftlab.load(fresh("llama"), tmp_path).configs["default"] == cfg


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_init_reload_in_peft_and_peftlab(init, tmp_path):
    """PEFT rewrites W0 to W0 − s·B0A0 at init and again in ``from_pretrained`` (from the base it is
    given), so reloading onto the original base reproduces the training-time model; peftlab keeps W0
    and its frozen s·B0A0 equals exactly what PEFT subtracted from the base."""
    batch = inputs("llama")
    theirs_model = peft.get_peft_model(fresh("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    name = "model.layers.1.self_attn.v_proj"
    residual = theirs_model.get_base_model().get_submodule(name).base_layer.weight.detach().clone()
    randomize(peft_trainable(theirs_model))
    theirs_model.eval()
    trained = outputs(theirs_model, batch)
    theirs_model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(fresh("llama"), tmp_path).eval()
    assert_same(outputs(reloaded, batch), trained)
    pm = peftlab.load(fresh("llama"), tmp_path)
    assert_same(outputs(pm, batch), trained)
    d = next(d for _, n, d in pm.placements["default"] if n == name)
    assert torch.equal(pm.model.get_submodule(name).weight, fresh("llama").get_submodule(name).weight)  # base untouched
    subtracted = fresh("llama").get_submodule(name).weight - residual
    torch.testing.assert_close(d.scaling * d.B0 @ d.A0, subtracted, atol=1e-5, rtol=0)


def _peft_config_dict(**changes: Any) -> dict[str, Any]:
    raw = json.loads(json.dumps(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).to_dict(), default=list))
    return {**raw, "peft_type": "LORA", **changes}


@pytest.mark.parametrize(
    "changes,init",
    [({}, "kaiming"), ({"init_lora_weights": False}, "kaiming"), ({"init_lora_weights": "eva"}, "kaiming"),
     ({"init_lora_weights": "orthogonal"}, "kaiming"), ({"init_lora_weights": "gaussian"}, "gaussian"),
     ({"init_lora_weights": "pissa"}, "pissa"), ({"init_lora_weights": "olora"}, "olora"),
     ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}, "loftq")],
)
def test_peft_inits_that_keep_the_base_are_read(changes, init):
    assert io.config_from_file_dict(_peft_config_dict(**changes)).init == init


@pytest.mark.parametrize(
    "changes",
    [{"init_lora_weights": "pissa_niter_4"}, {"init_lora_weights": "corda"},
     {"lora_bias": True}, {"bias": "all"}, {"alora_invocation_tokens": [1, 2]}, {"rank_pattern": {"q_proj": 2}},
     {"layer_replication": [[0, 1]]}],
    ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values()))),
)
def test_peft_fields_we_cannot_honour_are_refused(changes):
    """Refused loudly rather than loaded into a model that computes something else."""
    with pytest.raises(peftlab.AdapterFileError, match=next(iter(changes))):
        io.config_from_file_dict(_peft_config_dict(**changes))


def test_modules_to_save_are_never_lora_targets(tmp_path):
    """As in PEFT: a module with a trainable copy is not also given LoRA."""
    batch = inputs("bert_cls")
    cfg = LoraConfig(r=4, alpha=8, targets=["query", "value", "classifier"], modules_to_save=["classifier"])
    pm = peftlab.apply(fresh("bert_cls"), cfg)
    assert not any("classifier.lora" in k for k in pm.adapter_tensors())
    randomize(our_trainable(pm))
    pm.eval()
    pm.save(tmp_path / "ours")
    theirs_model = peft.PeftModel.from_pretrained(fresh("bert_cls"), tmp_path / "ours").eval()
    assert_same(outputs(pm, batch), outputs(theirs_model, batch))
    peft.get_peft_model(
        fresh("bert_cls"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=cfg.targets, modules_to_save=["classifier"])
    ).save_pretrained(tmp_path / "theirs")
    assert sorted(load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))) == sorted(pm.adapter_tensors())


def test_peft_is_not_a_runtime_dependency():
    code = "import sys, peftlab, peftlab.methods.reparam.lora; sys.exit('peft' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- mixed batches ----------------------------------------------------------------------------------
def _mixed_llama():
    """Tiny Llama with LoRA "a" (r=2, q/v), DoRA "b" (r=4, q/k/v/o) and LoRA "c" (r=3, q), all trained."""
    pm = peftlab.apply(fresh("llama"), LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]), adapter_name="a")
    pm.add_adapter("b", DoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    pm.add_adapter("c", LoraConfig(r=3, alpha=3, targets=["q_proj"]))
    for i, name in enumerate(pm.adapters):  # inactive adapters are frozen: randomize every parameter
        randomize([p for _, p in sorted(pm.adapter_modules[name].named_parameters())], seed=i + 1)
    return pm


ROWS = ["a", "b", None, "a"]


def _batch4():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (4, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_mixed_batch_equals_single_adapter_rows():
    pm = _mixed_llama().eval()
    batch = _batch4()
    mixed = outputs(pm, batch, adapter_names=ROWS)[0]
    for name in ("a", "b"):
        pm.set_adapter(name)
        single = outputs(pm, batch)[0]
        for i, row in enumerate(ROWS):
            if row == name:
                assert (mixed[i] - single[i]).abs().max().item() <= TOL
    with pm.disable_adapters():
        base = outputs(pm, batch)[0]
    assert (mixed[2] - base[2]).abs().max().item() <= TOL
    assert (mixed[0] - base[0]).abs().max().item() > 1e-3 and (mixed[1] - base[1]).abs().max().item() > 1e-3


def test_mixed_batch_sees_in_place_changes_of_dora_magnitudes():
    """Without autograd the stacked adapters are cached; editing only a DoRA magnitude (or the base
    weight its norm comes from) must invalidate that cache."""
    pm = _mixed_llama().eval()
    batch = _batch4()
    before = outputs(pm, batch, adapter_names=ROWS)[0]
    with torch.no_grad():
        for n, p in pm.adapter_modules["b"].named_parameters():
            if "magnitude" in n:
                p.mul_(1.5)
    after = outputs(pm, batch, adapter_names=ROWS)[0]
    pm.set_adapter("b")
    assert (after[1] - outputs(pm, batch)[0][1]).abs().max().item() <= TOL
    assert (after[1] - before[1]).abs().max().item() > 1e-3
    torch.testing.assert_close(after[0], before[0])  # rows of "a" unchanged


def _row_loss(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    w = torch.linspace(0.5, 1.5, logits.shape[-1])
    return sum((logits[i] * w).pow(2).mean() for i in rows)  # type: ignore[return-value]


def test_mixed_batch_gradients_reach_only_the_rows_adapters():
    pm = _mixed_llama()
    pm.set_adapter(["a", "b", "c"])  # all trainable; routing decides who computes
    pm.eval()  # no dropout; grads still flow
    batch = _batch4()
    logits = pm(**batch, adapter_names=ROWS).logits
    _row_loss(logits, [0, 1, 2, 3]).backward()
    mixed = {n: [p.grad for p in our_trainable(pm, n)] for n in ("a", "b", "c")}
    assert all(g is None or not g.any() for g in mixed["c"]), "adapter c is named by no row but got a gradient"
    for n in ("a", "b"):
        assert all(g is not None and g.abs().sum() > 0 for g in mixed[n]), f"adapter {n} got no gradient"
    # Each adapter's gradient is the gradient of its own rows' loss, computed with it alone.
    for name, rows in (("a", [0, 3]), ("b", [1])):
        pm.zero_grad(set_to_none=True)
        pm.set_adapter(name)
        _row_loss(pm(**batch).logits, rows).backward()
        for g_mixed, p in zip(mixed[name], our_trainable(pm, name)):
            torch.testing.assert_close(g_mixed, p.grad, atol=1e-5, rtol=1e-4)


def test_mixed_batch_matches_peft_mixed_batch(tmp_path):
    """PEFT mixes LoRA adapters per row (``"__base__"`` for base rows) but refuses DoRA ones."""
    pm = _mixed_llama().eval()
    batch = _batch4()
    for name in pm.adapters:
        pm.save(tmp_path / name, adapter_name=name)
    theirs_model = peft.PeftModel.from_pretrained(fresh("llama"), tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        theirs_model.load_adapter(tmp_path / name, adapter_name=name)
    theirs_model.eval()
    rows = ["a", "c", None, "a"]  # LoRA r=2 on q/v and LoRA r=3 on q only
    theirs = outputs(theirs_model, batch, adapter_names=[n or "__base__" for n in rows])
    assert_same(outputs(pm, batch, adapter_names=rows), theirs)
    assert_same(outputs(pm, batch, adapter_names=[n or "__base__" for n in rows]), theirs)  # same spelling as PEFT
    # Row by row, our DoRA mixed batch equals PEFT running DoRA "b" alone.
    theirs_model.set_adapter("b")
    assert_same([outputs(pm, batch, adapter_names=ROWS)[0][1]], [outputs(theirs_model, batch)[0][1]])
    # PEFT refuses DoRA rows. (Last: after that error PEFT leaves its adapter_names hooks registered,
    # because _enable_peft_forward_hooks does not remove them in a finally block.)
    with pytest.raises(ValueError, match="DoRA"):
        outputs(theirs_model, batch, adapter_names=["__base__" if n is None else n for n in ROWS])
