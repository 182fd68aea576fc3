"""The benchmark's models, batch shapes, inputs and losses.

``smollm2`` (SmolLM2-135M, Llama decoder, causal-LM loss) and ``minilm`` (all-MiniLM-L6-v2 with a
2-class head, classification loss) come from :func:`peftlab.zoo.load`; ``tiny`` is a tiny random
Llama built in-process (for tests). Every input is drawn from a seeded generator, so both libraries
see exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.bench.measure import touch_parameters


@dataclass(frozen=True)
class ModelSpec:
    """What the benchmark needs to know about one model."""

    name: str
    task: str  # "causal-lm" or "classification"
    qv: tuple[str, ...]  # the query and value projections' names
    head: str | None  # the classification head, trained in full (modules_to_save) in both libraries
    train_shape: tuple[int, int]  # (batch, tokens) of a training step and of plain inference
    mixed_shape: tuple[int, int]  # (rows, tokens) of the mixed-adapter prefill
    quick_train_shape: tuple[int, int]
    quick_mixed_shape: tuple[int, int]

    @property
    def decoder(self) -> bool:
        """Whether the model generates (has a decode step over a key/value cache)."""
        return self.task == "causal-lm"

    def shapes(self, quick: bool) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(train_shape, mixed_shape)`` for a full or a ``--quick`` run."""
        return (self.quick_train_shape, self.quick_mixed_shape) if quick else (self.train_shape, self.mixed_shape)


SPECS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec("smollm2", "causal-lm", ("q_proj", "v_proj"), None, (4, 256), (32, 128), (1, 32), (32, 16)),
    "minilm": ModelSpec("minilm", "classification", ("query", "value"), "classifier", (32, 128), (32, 128), (4, 32), (32, 16)),
    # Hidden: a tiny random Llama for the tests.
    "tiny": ModelSpec("tiny", "causal-lm", ("q_proj", "v_proj"), None, (2, 8), (32, 8), (2, 8), (32, 8)),
}
PUBLIC_MODELS = ("smollm2", "minilm")


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> nn.Module:
    """Load the model (eval mode, float32) on ``device`` with every weight resident in memory."""
    from peftlab import zoo

    if spec.name == "tiny":
        model = zoo.tiny_model("llama", task="causal-lm", seed=0)
    else:
        model, _ = zoo.load(spec.name, task=spec.task)
    model = model.to(device).eval()
    touch_parameters(model)
    return model


def make_batch(spec: ModelSpec, model: nn.Module, shape: tuple[int, int], seed: int, labels: bool,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random token ids (above the special tokens), a full attention mask, and labels if asked
    (the ids themselves for the causal-LM loss, random classes for classification)."""
    gen = torch.Generator().manual_seed(seed)
    rows, tokens = shape
    vocab = model.config.vocab_size
    ids = torch.randint(min(3, vocab - 1), vocab, (rows, tokens), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        if spec.task == "causal-lm":
            batch["labels"] = ids.clone()
        else:
            batch["labels"] = torch.randint(0, model.config.num_labels, (rows,), generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def prefill_kwargs(spec: ModelSpec, use_cache: bool = False) -> dict[str, Any]:
    """Extra arguments of an inference forward. A decoder's prefill computes the logits of the last
    position only (``logits_to_keep=1``), as ``generate`` does."""
    if not spec.decoder:
        return {}
    return {"use_cache": use_cache, "logits_to_keep": 1}


def logits(output: Any) -> torch.Tensor:
    """The logits of a model output (a tensor is returned as it is)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]
