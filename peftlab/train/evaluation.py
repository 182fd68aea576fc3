"""One forward pass with its loss, and evaluating a model on a loader (loss + task metrics)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from peftlab.train.examples import GENERATIVE_KINDS
from peftlab.train.metrics import compute_metrics

Batch = dict[str, torch.Tensor]


def output_field(output: Any, name: str, index: int) -> Any:
    """``output.name`` for an output object, ``output[name]`` for a dict, ``output[index]`` for a tuple."""
    if isinstance(output, Mapping):
        return output.get(name)
    if isinstance(output, (tuple, list)):
        return output[index] if len(output) > index else None
    return getattr(output, name, None)


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``enabled``, else a no-op context."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_available(device: torch.device) -> bool:
    """True when ``device`` is a CUDA device that supports bf16."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def to_device(batch: Mapping[str, Any], device: torch.device) -> Batch:
    """Move every tensor of ``batch`` to ``device``."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def forward_loss(model: nn.Module, batch: Batch, kind: str | None,
                 mixed_precision: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``model(**batch)`` and return (loss, logits).

    Uses the model's own loss; if it gives none, computes cross-entropy (classification) or MSE
    (regression, or float labels) from the logits.
    """
    device = batch["input_ids"].device if "input_ids" in batch else torch.device("cpu")
    with autocast_for(device, mixed_precision):
        output = model(**batch)
    logits = output_field(output, "logits", 1)
    loss = output_field(output, "loss", 0)
    if loss is None:
        if logits is None or "labels" not in batch:
            raise ValueError("model output has neither a loss nor logits and labels to compute one")
        loss = loss_from_logits(logits, batch["labels"], kind)
    return loss, logits


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, kind: str | None,
                     reduction: str = "mean") -> torch.Tensor:
    """The loss a sequence-classification head gives, in float32: MSE of ``logits.reshape(-1)``
    against the labels for regression (or float labels), else cross-entropy over the last dim;
    ``reduction`` as in torch (``"sum"``: Σ over rows, for a mean taken over several calls)."""
    if kind == "regression" or labels.is_floating_point():
        return nn.functional.mse_loss(logits.float().reshape(-1), labels.float().reshape(-1), reduction=reduction)
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       reduction=reduction)


def _first_attr(objects: Sequence[Any], name: str) -> Any:
    for obj in objects:
        value = getattr(obj, name, None)
        if value:
            return value
    return None


def task_of(loaders: Sequence[Any], batch: Batch | None, kind: str | None = None,
            metrics: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """Kind and metric names: the given ones, else those of the first loader whose dataset carries
    them (``EncodedDataset`` does), else guessed from the label dtype."""
    datasets = [getattr(loader, "dataset", None) for loader in loaders]
    if kind is None:
        kind = _first_attr(datasets, "kind")
    if kind is None:
        labels = batch.get("labels") if batch else None
        kind = "regression" if labels is not None and labels.is_floating_point() else "classification"
    names = list(metrics) if metrics is not None else None
    if names is None:
        found = _first_attr(datasets, "metrics")
        names = list(found) if found else None
    if names is None:
        names = ["pearson", "spearman"] if kind == "regression" else ["accuracy"]
    return kind, names


def evaluate_model(model: nn.Module, loader: Iterable[Mapping[str, Any]], device: str | torch.device = "cpu",
                   kind: str | None = None, metrics: Sequence[str] | None = None,
                   mixed_precision: bool | None = None, gather: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Mean loss and task metrics of ``model`` on ``loader``; the model's train/eval mode is restored.

    Classification predictions are the argmax of the logits, regression predictions the logits
    squeezed to one value per example. ``mixed_precision=None`` means bf16 where the device has it.
    ``gather`` (several processes, each with its share of the set: ``train/distributed.py``) turns
    this process's loss sum, count, predictions and labels into everyone's before the metrics are
    computed; it is given a function that repeats the last forward pass.
    Returns ``{"loss", <metric>..., "examples", "eval_time_s"}`` plus, so that a model that answers
    one class for everything shows, ``predicted_class_counts`` (examples per predicted class id;
    classification) or ``prediction_std`` (regression). A causal-lm or seq2seq eval set
    (``kind``, or its dataset's) is scored by :func:`~peftlab.train.generative_eval.evaluate_generative`.
    """
    device = torch.device(device)
    amp = bf16_available(device) if mixed_precision is None else mixed_precision
    if (kind or getattr(getattr(loader, "dataset", None), "kind", None)) in GENERATIVE_KINDS:
        from peftlab.train.generative_eval import evaluate_generative  # noqa: PLC0415 - it imports this module

        return evaluate_generative(model, loader, device, amp)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total_loss, count = 0.0, 0
    preds: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    names: list[str] = []
    try:
        with torch.no_grad():
            for raw in loader:
                batch = to_device(raw, device)
                if count == 0:
                    kind, names = task_of([loader], batch, kind, metrics)
                loss, logits = forward_loss(model, batch, kind, amp)
                if logits is None:
                    raise ValueError("model output has no logits to score")
                n = int(batch["labels"].shape[0])
                total_loss += float(loss) * n
                count += n
                logits = logits.float()
                if kind == "regression":
                    preds.append(logits.reshape(n, -1)[:, 0].cpu())
                else:
                    preds.append(logits.argmax(dim=-1).reshape(-1).cpu())
                labels.append(batch["labels"].reshape(-1).cpu())
            if gather is not None:
                total_loss, count, preds, labels = gather(total_loss, count, preds, labels,
                                                          lambda: forward_loss(model, batch, kind, amp))
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluation loader is empty")
    result: dict[str, Any] = {"loss": total_loss / count}
    predicted = torch.cat(preds)
    result.update(compute_metrics(names, predicted.numpy(), torch.cat(labels).numpy()))
    if kind == "regression":
        result["prediction_std"] = float(predicted.std(unbiased=False))
    else:
        result["predicted_class_counts"] = torch.bincount(predicted, minlength=int(logits.shape[-1])).tolist()
    result["examples"] = count
    result["eval_time_s"] = time.perf_counter() - start
    return result
