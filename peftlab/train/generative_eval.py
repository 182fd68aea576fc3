"""Evaluating a causal LM (instruction tuning) or a seq2seq model on a generative eval set:
held-out loss over response tokens, perplexity, and exact match of generated final answers."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from peftlab.train.answers import exact_match, extract_answer
from peftlab.train.evaluation import autocast_for, output_field, to_device
from peftlab.train.generative_data import IGNORE_INDEX, GenerativeDataset
from peftlab.train.generation import generate_continuations

#: Generations kept in the result, to read what the model answers.
SAMPLES_KEPT = 3


def response_token_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[float, int]:
    """(summed cross-entropy, token count) over the positions whose label is not -100; ``shift``
    for a causal LM, whose logits at position t predict the label at t + 1."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = labels.reshape(-1)
    total = nn.functional.cross_entropy(logits.float().reshape(flat.numel(), -1), flat,
                                        ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((flat != IGNORE_INDEX).sum())


def evaluate_generative(model: nn.Module, loader: Iterable[Mapping[str, Any]], device: str | torch.device = "cpu",
                        mixed_precision: bool = False, progress: bool = False) -> dict[str, Any]:
    """Loss, perplexity and (when the dataset has an answer regex) exact match of ``model``.

    loss = Σ −log p(yₜ | y<ₜ, prompt) / T over the T response tokens of the whole eval set (each
    token counts once, whatever its batch), perplexity = exp(loss). Exact match: greedy generation
    of ``settings.max_new_tokens`` after each prompt, final answers extracted with the regex from the
    generation and from the reference (:func:`~peftlab.train.answers.exact_match`). The model's
    train/eval mode is restored. Returns ``{"loss", "perplexity", "tokens", ["exact_match",
    "no_answer", "samples"], "examples", "eval_time_s"}``.
    """
    dataset = getattr(loader, "dataset", None)
    if not isinstance(dataset, GenerativeDataset):
        raise ValueError("evaluate_generative needs a loader over a GenerativeDataset")
    device = torch.device(device)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    total, tokens, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for raw in loader:
                batch = to_device(raw, device)
                with autocast_for(device, mixed_precision):
                    logits = output_field(model(**batch), "logits", 1)
                part, n = response_token_loss(logits, batch["labels"], shift=dataset.kind == "causal-lm")
                total, tokens, count = total + part, tokens + n, count + int(batch["labels"].shape[0])
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the eval set has no response tokens to score")
    loss = total / tokens
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    pattern = dataset.settings.answer_regex
    if pattern:
        generated = generate_continuations(model, dataset.tokenizer, dataset.prompt_ids,
                                           dataset.settings.max_new_tokens, device, dataset.settings.batch_size,
                                           progress=progress or dataset.settings.progress)
        result["exact_match"], result["no_answer"] = exact_match(generated, dataset.references, pattern)
        result["samples"] = [{"generated": g, "answer": extract_answer(g, pattern),
                              "reference_answer": extract_answer(r, pattern)}
                             for g, r in zip(generated[:SAMPLES_KEPT], dataset.references)]
    result["examples"] = count
    result["eval_time_s"] = time.perf_counter() - start
    return result
