"""A small training loop for Hugging Face style models: AdamW on the trainable parameters, linear
warmup/decay, gradient accumulation and clipping, periodic evaluation and checkpoints, and honest
measurements (wall time, throughput, peak memory)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from peftlab.core.model import PeftModel
from peftlab.train.evaluation import bf16_available, evaluate_model, forward_loss, task_of, to_device
from peftlab.train.memory import PeakMemory

SaveFn = Callable[[Path], None]
Batch = dict[str, torch.Tensor]


def linear_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): rises linearly to 1 over
    ``warmup_steps`` steps (the first step already gets 1/warmup_steps), then falls linearly so
    the last step gets 1/(total_steps - warmup_steps)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def save_trainable(model: nn.Module, directory: Path) -> None:
    """Default checkpoint: the parameters that require grad, as ``trainable.safetensors``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {n: p.detach().cpu().clone().contiguous()
               for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(directory / "trainable.safetensors"))


def _batch_size(batch: Batch) -> int:
    first = batch["labels"] if "labels" in batch else next(iter(batch.values()))
    return int(first.shape[0])


def _count_tokens(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


class Trainer:
    """Train ``model`` on ``train_loader`` and evaluate it on ``eval_loader``.

    The model is any ``nn.Module`` whose forward takes a batch dict as keyword arguments
    (``labels`` included) and returns an object (or dict/tuple) with ``loss`` and ``logits``; if
    ``loss`` is None it is computed from the logits (cross-entropy, or MSE for regression).
    The task kind and metric names come from ``kind``/``metrics`` when given, else from the
    loader's dataset (:class:`~peftlab.train.batching.EncodedDataset` carries them), else from
    the label dtype. ``optimizer_groups`` is a list of AdamW parameter groups (e.g. from
    ``peftlab.param_groups``); without it all parameters with ``requires_grad`` are optimised
    (weight decay, if any, on matrices only). Checkpoints are written at each ``eval_every`` step
    and at the end to ``checkpoint_dir/step-N`` and ``checkpoint_dir/final`` by ``save_fn(dir)``
    (default: :func:`save_trainable`). bf16 autocast is used only on a CUDA device that supports it.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader | Iterable[Batch],
        eval_loader: DataLoader | Iterable[Batch] | None = None,
        optimizer_groups: Sequence[dict[str, Any]] | None = None,
        lr: float = 1e-4,
        epochs: int = 1,
        max_steps: int | None = None,
        warmup_ratio: float = 0.06,
        weight_decay: float = 0.0,
        grad_accum: int = 1,
        eval_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        max_grad_norm: float | None = 1.0,
        progress: bool = True,
        device: str | torch.device = "cpu",
        seed: int = 0,
        save_fn: SaveFn | None = None,
        kind: str | None = None,
        metrics: Sequence[str] | None = None,
        calibration_batches: int = 8,
    ) -> None:
        """Check the settings and build the optimizer and schedule (see the class docstring)."""
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if max_steps is None and epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if eval_every is not None and eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        if save_fn is not None and checkpoint_dir is None:
            raise ValueError("save_fn needs checkpoint_dir: the folder the checkpoints go under")
        self.model = model
        # A PeftModel's methods may act during training (core/training.py): loss terms, per-step
        # actions, calibration. The trainer calls the container's protocol, never a method's code.
        self.peft = model if isinstance(model, PeftModel) else None
        self.calibration_batches = calibration_batches
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.lr = lr
        self.epochs = epochs
        self.grad_accum = grad_accum
        self.eval_every = eval_every
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.save_fn: SaveFn = save_fn or (lambda d: save_trainable(self.model, d))
        self.max_grad_norm = max_grad_norm
        self.progress = progress
        self.device = torch.device(device)
        self.seed = seed
        self.kind = kind
        self.metrics = list(metrics) if metrics is not None else None
        self.mixed_precision = bf16_available(self.device)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self._groups(optimizer_groups, weight_decay), lr=lr,
                                           weight_decay=weight_decay)
        self.total_steps = max_steps if max_steps is not None else self._steps_for_epochs()
        self.warmup_steps = math.ceil(warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: linear_schedule(s, self.warmup_steps, self.total_steps))

    # -- setup -------------------------------------------------------------------------------

    def _groups(self, groups: Sequence[dict[str, Any]] | None, weight_decay: float) -> list[dict[str, Any]]:
        if groups is not None:
            out = []
            for group in groups:
                params = group["params"]
                params = [params] if isinstance(params, torch.Tensor) else list(params)
                kept = [p for p in params if p.requires_grad]
                if kept:
                    out.append({**group, "params": kept})
        else:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            if weight_decay > 0:
                out = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
                       {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
                out = [g for g in out if g["params"]]
            else:
                out = [{"params": [p for _, p in named]}] if named else []
        if not out:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        return out

    def _steps_for_epochs(self) -> int:
        try:
            batches = len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("train_loader has no length: give max_steps") from None
        if batches == 0:
            raise ValueError("train_loader is empty")
        return self.epochs * math.ceil(batches / self.grad_accum)

    @property
    def trainable_params(self) -> int:
        """Number of scalar parameters the optimizer updates."""
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])

    def _task(self, loader: Any, batch: Batch | None = None) -> tuple[str, list[str]]:
        return task_of([loader, self.train_loader], batch, self.kind, self.metrics)

    def _dataset_attr(self, name: str, loader: Any) -> Any:
        for source in (loader, self.train_loader):
            value = getattr(getattr(source, "dataset", None), name, None)
            if value:
                return value
        return None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, loader: DataLoader | Iterable[Batch] | None = None) -> dict[str, Any]:
        """Mean loss and the task's metrics on ``loader`` (default: the eval loader); see
        :func:`~peftlab.train.evaluation.evaluate_model`."""
        loader = loader if loader is not None else self.eval_loader
        if loader is None:
            raise ValueError("no loader to evaluate")
        kind = self.kind or self._dataset_attr("kind", loader)
        metrics = self.metrics or self._dataset_attr("metrics", loader)
        result = evaluate_model(self.model, loader, self.device, kind, metrics, self.mixed_precision)
        self._sync()
        return result

    # -- training --------------------------------------------------------------------------------

    def _accumulation_groups(self) -> Iterator[list[Batch]]:
        """Micro-batches grouped by ``grad_accum``, cycling over epochs; a short last group closes
        each epoch."""
        while True:
            group: list[Batch] = []
            seen = False
            for batch in self.train_loader:
                seen = True
                group.append(batch)
                if len(group) == self.grad_accum:
                    yield group
                    group = []
            if group:
                yield group
            if not seen:
                raise ValueError("train_loader is empty")

    def _checkpoint(self, name: str) -> str | None:
        if self.checkpoint_dir is None:
            return None
        directory = self.checkpoint_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        self.save_fn(directory)
        return str(directory)

    def train(self) -> dict[str, Any]:
        """Run the optimisation and return a report.

        Keys: steps, epochs, loss_curve (mean loss of each optimizer step), lr_curve (first
        group's lr at each step), final_loss, eval (final evaluation or None), eval_history,
        checkpoints, wall_time_s (whole call), train_time_s (optimizer steps only, evaluations
        and checkpoints excluded), examples, tokens (non-padding), examples_per_s, tokens_per_s,
        steps_per_s, peak_memory_bytes, peak_memory_method, baseline_memory_bytes, device,
        mixed_precision, trainable_params.
        """
        wall_start = time.perf_counter()
        torch.manual_seed(self.seed)
        self.model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        kind = self.kind
        loss_curve: list[float] = []
        lr_curve: list[float] = []
        eval_history: list[dict[str, Any]] = []
        checkpoints: list[str] = []
        examples = tokens = step = 0
        train_time = 0.0
        batches_per_epoch = self._batches_per_epoch()
        micro_batches = 0
        bar = tqdm(total=self.total_steps, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        groups = self._accumulation_groups()
        if self.peft is not None:
            self.peft.begin_training(self.total_steps)
        if self.peft is not None and self.peft.needs_calibration:
            sample = [to_device(b, self.device) for _, b in zip(range(self.calibration_batches), self.train_loader)]
            self.peft.calibrate(sample)
        with bar, PeakMemory(self.device) as memory:
            while step < self.total_steps:
                step_start = time.perf_counter()
                group = next(groups)
                lr = self.optimizer.param_groups[0]["lr"]
                loss_sum = 0.0
                for raw in group:
                    batch = to_device(raw, self.device)
                    if kind is None:
                        kind = self._task(self.train_loader, batch)[0]
                    loss, _ = forward_loss(self.model, batch, kind, self.mixed_precision)
                    objective = loss if self.peft is None else loss + self.peft.regularizer()
                    (objective / len(group)).backward()
                    loss_sum += float(loss.detach())
                    examples += _batch_size(batch)
                    tokens += _count_tokens(batch)
                micro_batches += len(group)
                mean_loss = loss_sum / len(group)
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss became {mean_loss} at step {step + 1}")
                if self.max_grad_norm:
                    nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                if self.peft is not None:
                    self.peft.on_step()  # before zero_grad: methods may read the gradients
                self.optimizer.zero_grad(set_to_none=True)
                self._sync()
                train_time += time.perf_counter() - step_start
                step += 1
                loss_curve.append(mean_loss)
                lr_curve.append(lr)
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if self.eval_every and step % self.eval_every == 0 and step < self.total_steps:
                    if self.eval_loader is not None:
                        eval_history.append({"step": step, **self.evaluate(self.eval_loader)})
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                                        eval_loss=f"{eval_history[-1]['loss']:.4f}", refresh=False)
                    saved = self._checkpoint(f"step-{step}")
                    if saved:
                        checkpoints.append(saved)
        final_eval = None
        if self.eval_loader is not None:
            final_eval = self.evaluate(self.eval_loader)
            eval_history.append({"step": step, **final_eval})
        saved = self._checkpoint("final")
        if saved:
            checkpoints.append(saved)
        return {
            "steps": step,
            "epochs": micro_batches / batches_per_epoch if batches_per_epoch else None,
            "loss_curve": loss_curve,
            "lr_curve": lr_curve,
            "final_loss": loss_curve[-1],
            "eval": final_eval,
            "eval_history": eval_history,
            "checkpoints": checkpoints,
            "wall_time_s": time.perf_counter() - wall_start,
            "train_time_s": train_time,
            "examples": examples,
            "tokens": tokens,
            "examples_per_s": examples / train_time if train_time else 0.0,
            "tokens_per_s": tokens / train_time if train_time else 0.0,
            "steps_per_s": step / train_time if train_time else 0.0,
            "peak_memory_bytes": memory.peak_bytes,
            "peak_memory_method": memory.method,
            "baseline_memory_bytes": memory.baseline_bytes,
            "device": str(self.device),
            "mixed_precision": "bf16" if self.mixed_precision else None,
            "trainable_params": self.trainable_params,
        }

    def _batches_per_epoch(self) -> int | None:
        try:
            return len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:
            return None
