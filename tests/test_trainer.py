"""Metrics, peak-memory measurement and the Trainer on a tiny BERT built from a config."""

from __future__ import annotations

import math
import os
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftlab.train.data import Examples, find_data_dir, load_task, make_loader
from peftlab.train.memory import PeakMemory
from peftlab.train.metrics import (
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    pearson,
    rankdata,
    spearman,
)
from peftlab.train.trainer import Trainer, linear_schedule

needs_data = pytest.mark.skipif(find_data_dir() is None, reason="benchmark data (shared/data) not found")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two OpenMP threads spin and
    a 0.5 s test takes 15 s. The previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- metrics --------------------------------------------------------------------------------------

def test_accuracy_and_f1_by_hand() -> None:
    preds, labels = [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    # TP=2 (rows 0, 3), FP=1 (row 1), FN=1 (row 4): F1 = 2*2 / (2*2 + 1 + 1)
    assert f1(preds, labels) == pytest.approx(4 / 6)
    assert f1([0, 0], [0, 0]) == 0.0  # no positives anywhere
    assert f1(np.array([0, 1]), np.array([1, 0])) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 3 labels"):
        accuracy([1, 0], [1, 0, 1])


def test_pearson_against_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.6 * x + rng.normal(size=200)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_spearman_with_ties_by_hand() -> None:
    assert rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert rankdata([3, 1, 3, 3]).tolist() == [3.0, 1.0, 3.0, 3.0]
    x, y = [10, 20, 20, 30], [1, 3, 2, 4]
    assert spearman(x, y) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 3, 2, 4])[0, 1])
    # No ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) with d = (0, 1, 1, 0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    z = np.linspace(-2, 2, 50)
    assert spearman(z, np.exp(3 * z)) == pytest.approx(1.0)  # monotone, far from linear
    assert pearson(z, np.exp(3 * z)) < 0.9


def test_matthews_by_hand() -> None:
    # TP=1, FP=1, TN=2, FN=0: (1*2 - 1*0) / sqrt(2 * 1 * 3 * 2)
    assert matthews_corrcoef([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(2 / math.sqrt(12))
    assert matthews_corrcoef([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0], [0, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction: undefined -> 0
    # 3 classes: confusion rows (true) [[2,1,0],[0,2,0],[0,1,1]]; t=(3,2,2), p=(2,4,1), c=5, s=7
    preds = [0, 0, 1, 1, 1, 1, 2]
    labels = [0, 0, 0, 1, 1, 2, 2]
    expected = (5 * 7 - (3 * 2 + 2 * 4 + 2 * 1)) / math.sqrt((49 - (4 + 16 + 1)) * (49 - (9 + 4 + 4)))
    assert matthews_corrcoef(preds, labels) == pytest.approx(expected)


def test_compute_metrics() -> None:
    out = compute_metrics(["accuracy", "f1", "mcc"], [1, 0, 1, 1], [1, 0, 0, 1])
    assert out == pytest.approx({"accuracy": 0.75, "f1": 0.8, "mcc": 1 / math.sqrt(3)})
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        compute_metrics(["auc"], [1], [1])


# -- peak memory ----------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sample", [False, True])
def test_peak_memory_sees_a_transient_allocation(sample: bool) -> None:
    with PeakMemory("cpu", interval=0.01, sample=sample) as mem:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, every page touched
        time.sleep(0.1)
        del block
    if sample:
        assert mem.method == "rss_sampling"
    else:
        assert mem.method in ("vmhwm", "rss_sampling")  # vmhwm where clear_refs may be written
    assert 48 * 2**20 <= mem.peak_bytes < 512 * 2**20
    assert mem.baseline_bytes > 0


# -- the trainer ----------------------------------------------------------------------------------

def _tokenizer(tmp: Path, examples: Examples):
    """A real BERT tokenizer whose vocabulary holds every whitespace word of the examples."""
    from transformers import BertTokenizerFast

    words = sorted({w for t in examples.texts for s in t for w in s.lower().split()})
    folder = tmp / "tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder))


def _tiny_bert(tmp: Path, examples: Examples, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _tokenizer(tmp, examples)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        num_labels=examples.num_labels)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config), tokenizer


@pytest.fixture(scope="module")
def sst64() -> Examples:
    if find_data_dir() is None:
        pytest.skip("benchmark data (shared/data) not found")
    return load_task("glue_sst2", "train", limit=64, seed=0)


REPORT_KEYS = {
    "steps", "epochs", "loss_curve", "lr_curve", "final_loss", "eval", "eval_history", "checkpoints",
    "wall_time_s", "train_time_s", "examples", "tokens", "examples_per_s", "tokens_per_s", "steps_per_s",
    "peak_memory_bytes", "peak_memory_method", "baseline_memory_bytes", "device", "mixed_precision",
    "trainable_params",
}


def test_full_finetune_lowers_loss_on_real_sst2(sst64: Examples, tmp_path: Path) -> None:
    model, tok = _tiny_bert(tmp_path, sst64)
    train = make_loader(sst64, tok, batch_size=16, shuffle=True, seed=0)
    evals = make_loader(sst64, tok, batch_size=64)
    saved: list[Path] = []

    def save_fn(directory: Path) -> None:
        assert directory.is_dir()
        saved.append(directory)

    trainer = Trainer(model, train, evals, lr=3e-3, epochs=8, eval_every=16, checkpoint_dir=tmp_path / "ck",
                      save_fn=save_fn, progress=False, seed=0)
    before = trainer.evaluate()
    result = trainer.train()
    assert REPORT_KEYS <= set(result)
    assert result["steps"] == 32 and result["epochs"] == 8.0 and len(result["loss_curve"]) == 32
    assert result["eval"]["loss"] < before["loss"] - 0.02
    assert set(result["eval"]) == {"loss", "accuracy", "examples", "eval_time_s", "predicted_class_counts"}
    assert sum(result["eval"]["predicted_class_counts"]) == result["eval"]["examples"]
    assert [h["step"] for h in result["eval_history"]] == [16, 32]
    # save_fn writes into a temporary folder, renamed into place once the checkpoint is complete
    assert [p.name for p in saved] == [f".tmp-{name}-{os.getpid()}" for name in ("step-16", "final")]
    assert result["checkpoints"] == [str(tmp_path / "ck" / "step-16"), str(tmp_path / "ck" / "final")]
    assert result["peak_memory_bytes"] > 0 and result["peak_memory_method"] in ("vmhwm", "rss_sampling", "ru_maxrss")
    assert result["examples"] == 8 * 64
    tokens_per_epoch = sum(len(f["input_ids"]) for f in train.dataset.features)
    assert result["tokens"] == 8 * tokens_per_epoch
    assert result["examples_per_s"] > 0 and result["tokens_per_s"] > result["examples_per_s"]
    assert 0 < result["train_time_s"] <= result["wall_time_s"]
    assert result["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert result["mixed_precision"] is None and result["device"] == "cpu"
    # Linear warmup (ceil(0.06 * 32) = 2 steps) then linear decay.
    lrs = result["lr_curve"]
    assert lrs[:3] == pytest.approx([1.5e-3, 3e-3, 3e-3]) and lrs[-1] == pytest.approx(3e-3 / 30)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_linear_schedule() -> None:
    assert [linear_schedule(s, 2, 6) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert linear_schedule(0, 0, 4) == 1.0 and linear_schedule(3, 0, 4) == 0.25


def test_max_steps_grad_accum_and_default_checkpoint(sst64: Examples, tmp_path: Path) -> None:
    model, tok = _tiny_bert(tmp_path, sst64)
    for p in model.bert.parameters():
        p.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.bert.named_parameters()}
    head = model.classifier.weight.detach().clone()
    train = make_loader(sst64, tok, batch_size=16, shuffle=True)  # 4 batches an epoch
    trainer = Trainer(model, train, None, lr=1e-2, max_steps=3, grad_accum=3, checkpoint_dir=tmp_path / "ck",
                      progress=False)
    assert trainer.total_steps == 3
    result = trainer.train()
    # groups of 3 micro-batches: [3, 1] per epoch, so 3 steps use 3 + 1 + 3 batches
    assert result["steps"] == 3 and result["examples"] == 7 * 16 and result["epochs"] == pytest.approx(7 / 4)
    assert result["eval"] is None and result["eval_history"] == []
    assert result["trainable_params"] == model.classifier.weight.numel() + model.classifier.bias.numel()
    assert all(torch.equal(p, frozen[n]) for n, p in model.bert.named_parameters())
    assert not torch.equal(model.classifier.weight, head)
    stored = load_file(str(tmp_path / "ck" / "final" / "trainable.safetensors"))
    assert set(stored) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(stored["classifier.weight"], model.classifier.weight.detach())


def test_param_groups_keep_only_trainable_and_their_lr(sst64: Examples, tmp_path: Path) -> None:
    model, tok = _tiny_bert(tmp_path, sst64)
    model.bert.embeddings.requires_grad_(False)
    groups = [
        {"params": list(model.bert.parameters()), "lr": 1e-3, "name": "body"},
        {"params": list(model.classifier.parameters()), "lr": 1e-2, "name": "head"},
    ]
    trainer = Trainer(model, make_loader(sst64, tok, batch_size=32), optimizer_groups=groups, lr=5e-4,
                      warmup_ratio=0.0, progress=False)
    optimizer_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimizer_params for p in model.bert.embeddings.parameters())
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-2]
    result = trainer.train()
    assert result["lr_curve"] == pytest.approx([1e-3, 5e-4])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, make_loader(sst64, tok, batch_size=32), progress=False)
    with pytest.raises(ValueError, match="save_fn needs checkpoint_dir"):
        Trainer(model, [], save_fn=lambda d: None)


@needs_data
def test_regression_on_real_stsb(tmp_path: Path) -> None:
    stsb = load_task("glue_stsb", "train", limit=48, seed=0)
    model, tok = _tiny_bert(tmp_path, stsb)
    assert model.config.num_labels == 1
    train = make_loader(stsb, tok, batch_size=16, shuffle=True)
    trainer = Trainer(model, train, make_loader(stsb, tok, batch_size=48), lr=3e-3, epochs=6, progress=False)
    before = trainer.evaluate()
    result = trainer.train()
    assert set(result["eval"]) >= {"loss", "pearson", "spearman"}
    assert -1.0 <= result["eval"]["pearson"] <= 1.0
    assert result["eval"]["loss"] < before["loss"]  # MSE against scores in [0, 5]


class BagOfWords(nn.Module):
    """A model whose output has logits but no loss: the trainer must compute it."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, 16, mode="sum")
        self.out = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        pooled = self.embed(input_ids, per_sample_weights=attention_mask.float())
        return {"loss": None, "logits": self.out(pooled)}


def test_loss_computed_from_logits_when_model_gives_none(sst64: Examples, tmp_path: Path) -> None:
    _, tok = _tiny_bert(tmp_path, sst64)
    torch.manual_seed(0)
    model = BagOfWords(tok.vocab_size)
    loader = make_loader(sst64, tok, batch_size=16, shuffle=True)
    trainer = Trainer(model, loader, make_loader(sst64, tok, batch_size=64), lr=5e-2, epochs=5, progress=False)
    before = trainer.evaluate()
    result = trainer.train()
    assert result["eval"]["loss"] < before["loss"] - 0.05
    assert result["eval"]["accuracy"] > 0.8  # a bag of words memorises 64 sentences


class Linear(nn.Module):
    """Plain regression on feature vectors; returns a namespace with logits and no loss."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> object:
        return types.SimpleNamespace(loss=None, logits=self.proj(x))


def test_plain_iterable_of_float_batches_is_regression() -> None:
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    batches = []
    for _ in range(8):
        x = torch.randn(16, 4, generator=generator)
        batches.append({"x": x, "labels": x @ weights})
    torch.manual_seed(0)
    model = Linear()
    trainer = Trainer(model, batches, batches, lr=0.1, max_steps=40, warmup_ratio=0.0, progress=False)
    before = trainer.evaluate()
    result = trainer.train()
    assert set(result["eval"]) == {"loss", "pearson", "spearman", "examples", "eval_time_s", "prediction_std"}
    assert result["eval"]["loss"] < before["loss"] / 5 and result["eval"]["pearson"] > 0.95, result["eval"]
    assert result["epochs"] == 5.0 and result["tokens"] == 0


def test_non_finite_loss_stops_training() -> None:
    class Broken(Linear):
        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> object:
            out = self.proj(x)
            return {"loss": out.sum() * float("nan"), "logits": out}

    batches = [{"x": torch.ones(2, 4), "labels": torch.zeros(2)}]
    with pytest.raises(FloatingPointError, match="training loss became nan at step 1"):
        Trainer(Broken(), batches, max_steps=3, progress=False).train()
