"""``transformers.Trainer`` (the real one, no mocks) trains a peftlab ``PeftModel``.

Plain ``Trainer`` with default arguments: the container's ``forward`` shows the base's signature,
so the Trainer keeps the right columns and finds ``labels`` (classification head, causal LM), and
trains. ``peftlab.train.hf_trainer.AdapterTrainer``: ``save_model`` and every checkpoint hold the
adapter files only, and a resumed run ends where an uninterrupted one does (real MiniLM, SST-2).
"""

from __future__ import annotations

import copy
import inspect
import io as bytes_io
import math
import pickle
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import peftlab
from peftlab.core.io import AdapterFileError
from peftlab.train.data import encode, load_task
from peftlab.train.hf_trainer import AdapterTrainer, load_adapters_in_place
from peftlab.zoo import tiny_batch, tiny_model

from conftest import first_output, one_thread, randomize_adapter

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

#: Files a Trainer checkpoint may hold besides the adapter's own.
TRAINER_FILES = {
    "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin", "scaler.pt",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "chat_template.jinja",
}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "peftlab_config.json"}


def _args(out, **kw) -> transformers.TrainingArguments:
    """Default TrainingArguments except what a CPU test must set."""
    return transformers.TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True, **kw)


class Rows(torch.utils.data.Dataset):
    """A list of dicts as a torch Dataset (``datasets`` is not installed)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _token_rows(n: int, seq: int, labels: str, seed: int = 0) -> Rows:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 128, (seq,), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long),
                     "labels": ids.clone() if labels == "tokens" else i % 2})
    return Rows(rows)


def _adapter_state(pm, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.adapter_modules[name].state_dict().items()}


# -- the signature Trainer reads ------------------------------------------------------------------------
@pytest.mark.parametrize("kind,task", [("bert", "classification"), ("llama", "causal-lm")])
def test_forward_shows_the_base_signature_plus_adapter_names(kind, task):
    model = tiny_model(kind, task=task)
    pm = peftlab.apply(model, "lora[r=4]")
    assert isinstance(pm, peftlab.PeftModel)
    base = inspect.signature(model.forward).parameters
    ours = inspect.signature(pm.forward).parameters
    assert [n for n in ours if n != "adapter_names"] == list(base)
    assert ours["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY and ours["adapter_names"].default is None
    # Trainer reads the class: labels and the columns it keeps
    assert transformers.utils.generic.find_labels(type(pm)) == ["labels"]
    if kind == "llama":
        assert [n for n in inspect.signature(pm.generate).parameters if n != "adapter_names"] == list(
            inspect.signature(model.generate).parameters)


def test_signed_container_calls_pickles_and_compiles(tiny):
    model, batch = tiny("llama", task="causal-lm")
    pm = peftlab.apply(model, "lora[r=4]")
    randomize_adapter(pm)
    with torch.no_grad():
        ref = first_output(pm(**batch))
        torch.testing.assert_close(first_output(pm(batch["input_ids"], batch["attention_mask"])), ref, atol=0, rtol=0)
        for other in (copy.deepcopy(pm), pickle.loads(pickle.dumps(pm))):
            assert type(other) is type(pm)
            torch.testing.assert_close(first_output(other(**batch)), ref, atol=0, rtol=0)
        buf = bytes_io.BytesIO()
        torch.save(pm, buf)
        buf.seek(0)
        assert type(torch.load(buf, weights_only=False)) is type(pm)
        compiled = torch.compile(pm, backend="aot_eager")
        torch.testing.assert_close(first_output(compiled(**batch)), ref, atol=1e-5, rtol=1e-5)
    # a plain module: its own parameter names
    seq = peftlab.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), "lora[r=2,targets=0]")
    assert list(inspect.signature(seq.forward).parameters) == ["input", "adapter_names"]


# -- plain transformers.Trainer, default arguments ------------------------------------------------------
def test_plain_trainer_trains_a_classification_head_and_evaluates_with_labels(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("bert", task="classification")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftlab.apply(model, "lora[r=4,targets=query|value]", modules_to_save=["classifier"])
    start = _adapter_state(pm)
    seen = {}

    def metrics(pred):
        seen["labels"] = pred.label_ids
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    data = _token_rows(16, 8, labels="class")
    trainer = transformers.Trainer(model=pm, args=_args(tmp_path, max_steps=4, per_device_train_batch_size=4,
                                                        learning_rate=1e-2),
                                   train_dataset=data, eval_dataset=data, compute_metrics=metrics)
    assert trainer.label_names == ["labels"]
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    result = trainer.evaluate()
    assert math.isfinite(result["eval_loss"]) and "eval_accuracy" in result
    assert list(seen["labels"]) == [i % 2 for i in range(16)]
    assert any(not torch.equal(start[k], v) for k, v in _adapter_state(pm).items())
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_plain_trainer_trains_a_causal_lm(tmp_path):
    torch.manual_seed(0)
    pm = peftlab.apply(tiny_model("llama", task="causal-lm"), "lora[r=4]")
    data = _token_rows(16, 8, labels="tokens")
    trainer = transformers.Trainer(model=pm, args=_args(tmp_path, max_steps=6, per_device_train_batch_size=4,
                                                        learning_rate=1e-2),
                                   train_dataset=data, eval_dataset=data)
    assert trainer.label_names == ["labels"]
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    last = trainer.evaluate()["eval_loss"]
    assert math.isfinite(first) and last < first


# -- AdapterTrainer on the real MiniLM: adapter-only files, exact resume -----------------------------
MAX_STEPS, SAVE_STEPS = 6, 3
LORA = "lora[r=8,alpha=16,targets=query|value]"


@pytest.fixture(scope="module")
def minilm():
    model, tok = peftlab.zoo.load("minilm", task="classification", num_labels=2)
    data = encode(load_task("glue_sst2", "train", limit=64), tok, max_length=32)
    return model, tok, data


def _minilm_run(minilm, out: Path, resume: str | None = None, seed: int = 0):
    base, tok, data = minilm
    torch.manual_seed(seed)  # a resumed run starts from another init: the checkpoint must restore it
    pm = peftlab.apply(copy.deepcopy(base), LORA, modules_to_save=["classifier"])
    args = _args(out, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, logging_steps=1, per_device_train_batch_size=8,
                 per_device_eval_batch_size=32, learning_rate=5e-3)
    trainer = AdapterTrainer(model=pm, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
    initial = trainer.evaluate()["eval_loss"] if resume is None else None
    trainer.train(resume_from_checkpoint=resume)
    return pm, trainer, initial


@pytest.fixture(scope="module")
def straight(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    pm, trainer, initial = _minilm_run(minilm, out)
    return out, pm, trainer, initial


@pytest.mark.real
def test_adapter_trainer_trains_minilm_and_leaves_the_base_alone(minilm, straight):
    base = minilm[0]
    _, pm, trainer, initial = straight
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == MAX_STEPS and all(math.isfinite(v) for v in losses)
    assert trainer.evaluate()["eval_loss"] < initial
    trained = pm.model.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(trained[k], v), k


@pytest.mark.real
def test_saved_model_and_checkpoints_hold_the_adapter_only(minilm, straight, tmp_path):
    base, tok, data = minilm
    out, pm, trainer, _ = straight
    trainer.save_model(str(tmp_path / "final"))
    adapter_keys = set(pm.adapter_tensors("default"))
    for d in (tmp_path / "final", out / f"checkpoint-{SAVE_STEPS}", out / f"checkpoint-{MAX_STEPS}"):
        names = {p.name for p in d.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert names <= ADAPTER_FILES | TRAINER_FILES, names - ADAPTER_FILES - TRAINER_FILES
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            assert set(f.keys()) == adapter_keys
        assert (d / "adapter_model.safetensors").stat().st_size < 1_000_000  # the base is ~90 MB
    # loads onto a fresh base with the trained outputs
    batch = tok(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    pm.eval()
    with torch.no_grad():
        want = pm(**batch).logits
        loaded = peftlab.load(copy.deepcopy(base).eval(), tmp_path / "final")
        torch.testing.assert_close(loaded(**batch).logits, want, atol=1e-6, rtol=1e-5)
        with loaded.disable_adapters():
            assert not torch.allclose(loaded(**batch).logits, want, atol=1e-4)


@pytest.mark.real
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(minilm, straight, tmp_path):
    out, pm, trainer, _ = straight
    resumed_pm, resumed, _ = _minilm_run(minilm, tmp_path, resume=str(out / f"checkpoint-{SAVE_STEPS}"), seed=1)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    again = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert again == pytest.approx(losses, rel=1e-5, abs=1e-6)
    want, got = _adapter_state(pm), _adapter_state(resumed_pm)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


# -- AdapterTrainer details on tiny models ------------------------------------------------------------
def test_best_model_at_end_is_loaded_into_the_adapter(tmp_path):
    torch.manual_seed(0)
    pm = peftlab.apply(tiny_model("bert", task="classification"), "lora[r=4,targets=query|value]",
                       modules_to_save=["classifier"])
    data = _token_rows(16, 8, labels="class")
    args = _args(tmp_path, max_steps=6, per_device_train_batch_size=4, learning_rate=5e-2, eval_strategy="steps",
                 eval_steps=2, save_steps=2, load_best_model_at_end=True)
    trainer = AdapterTrainer(model=pm, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    fresh = peftlab.load(tiny_model("bert", task="classification"), best)
    want = _adapter_state(fresh)
    for k, v in _adapter_state(pm).items():
        assert torch.equal(v, want[k]), k


def test_several_adapters_round_trip_in_place(tmp_path):
    pm = peftlab.apply(tiny_model("bert", task="classification"), "lora[r=4,targets=query]", adapter_name="a")
    pm.add_adapter("b", "ia3")
    randomize_adapter(pm, "a", seed=1)
    randomize_adapter(pm, "b", seed=2)
    saved = {n: _adapter_state(pm, n) for n in ("a", "b")}
    pm.save_pretrained(tmp_path)  # "a" (no "default": the first) at the root, "b" in b/
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "b" / "adapter_model.safetensors").is_file()
    params = [p for n in ("a", "b") for p, _ in pm.adapter_parameters(n)]
    randomize_adapter(pm, "a", seed=3)
    randomize_adapter(pm, "b", seed=4)
    assert load_adapters_in_place(pm, tmp_path) == ["a", "b"]
    assert [p for n in ("a", "b") for p, _ in pm.adapter_parameters(n)] == params  # same objects
    for n in ("a", "b"):
        for k, v in _adapter_state(pm, n).items():
            assert torch.equal(v, saved[n][k]), (n, k)
    # another config: refused before anything changes
    other = peftlab.apply(tiny_model("bert", task="classification"), "lora[r=2,targets=query]", adapter_name="a")
    other.add_adapter("b", "ia3")
    kept = _adapter_state(other, "a")
    with pytest.raises(AdapterFileError, match="differs"):
        load_adapters_in_place(other, tmp_path)
    assert all(torch.equal(v, kept[k]) for k, v in _adapter_state(other, "a").items())


def test_adapter_trainer_checkpoints_a_model_with_tied_embeddings(tmp_path):
    """GPT-2 ties lm_head to wte: plain Trainer's final checkpoint (the whole state_dict through
    safetensors) raises on the shared tensors; the adapter files have none."""
    pm = peftlab.apply(tiny_model("gpt2", task="causal-lm"), "lora[r=4]")
    assert pm.model.lm_head.weight is pm.model.transformer.wte.weight
    trainer = AdapterTrainer(model=pm, args=_args(tmp_path, max_steps=2), train_dataset=_token_rows(8, 8, labels="tokens"))
    trainer.train()
    names = {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in names and names <= ADAPTER_FILES | TRAINER_FILES


def test_adapter_trainer_leaves_other_models_to_the_trainer(tmp_path):
    model = tiny_model("bert", task="classification")
    trainer = AdapterTrainer(model=model, args=_args(tmp_path, max_steps=1, save_strategy="no"),
                             train_dataset=_token_rows(4, 8, labels="class"))
    trainer.save_model(str(tmp_path / "full"))
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert not (tmp_path / "full" / "adapter_model.safetensors").exists()
