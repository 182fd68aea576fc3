"""A small training loop for Hugging Face style models: AdamW on the trainable parameters, an lr
schedule with warmup (``schedules``), gradient accumulation and clipping, gradient checkpointing,
bf16 autocast, periodic evaluation with early stopping, a log (``run_log``), checkpoints that resume
exactly (``checkpoint``), and honest measurements (wall time, throughput, peak memory)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from peftlab.core.model import PeftModel
from peftlab.core.model_calls import checkpointing_enabled, enable_checkpointing
from peftlab.train.checkpoint import (
    CheckpointError,
    checkpoint_folders,
    load_model_tensors,
    load_trainer_state,
    prune_checkpoints,
    save_trainer_state,
    write_checkpoint,
)
from peftlab.train.data_order import BatchStream
from peftlab.train.distributed import OneProcess, unwrap
from peftlab.train.early_stopping import EarlyStopping
from peftlab.train.evaluation import bf16_available, evaluate_model, forward_loss, task_of, to_device
from peftlab.train.memory import PeakMemory
from peftlab.train.progress import RunProgress
from peftlab.train.rng_state import capture_rng, restore_rng
from peftlab.train.run_log import RunLog
from peftlab.train.schedules import linear_schedule, make_scheduler

__all__ = ["Trainer", "bf16_unavailable_reason", "linear_schedule", "save_trainable"]

SaveFn = Callable[[Path], None]
Batch = dict[str, torch.Tensor]


def bf16_unavailable_reason(device: str | torch.device) -> str | None:
    """Why bf16 autocast cannot be used on ``device`` (None when it can): the trainer uses it on
    CUDA GPUs that support bf16 (compute capability 8.0 or newer)."""
    device = torch.device(device)
    if bf16_available(device):
        return None
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return (f"{torch.cuda.get_device_name(device)} ({device}, compute capability {major}.{minor}) does not "
                "support bf16; it needs 8.0 or newer (A100, H100, RTX 30xx and later)")
    if device.type == "cuda":
        return f"device {device}: CUDA is not available on this machine"
    return (f"device {device} has no bf16 training here: peftlab trains in bf16 on CUDA GPUs that support it "
            "(compute capability 8.0+); use --device cuda on such a machine, or leave bf16 off")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing (non-reentrant) in ``model``: a PeftModel through its own
    method, a transformers model through :func:`~peftlab.core.model_calls.enable_checkpointing`.
    A model without the mechanism is a ``ValueError``."""
    try:
        if isinstance(model, PeftModel):
            model.gradient_checkpointing_enable()
        else:
            enable_checkpointing(model, {"use_reentrant": False})
    except (AttributeError, ValueError) as err:
        raise ValueError(f"gradient checkpointing: {type(model).__name__} does not support it ({err})") from err
    if not checkpointing_enabled(model):
        raise ValueError(f"gradient checkpointing: {type(model).__name__} has no layer that checkpoints")


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
    (weight decay, if any, on matrices only).

    Schedule: ``lr_scheduler`` (linear, cosine, constant, constant_with_warmup; see
    :mod:`~peftlab.train.schedules`) over ``warmup_steps`` steps of warmup (default:
    ceil(``warmup_ratio`` × steps)). ``bf16``: None uses bf16 autocast where the device supports it
    (CUDA, compute capability 8.0+), True requires it (a ``ValueError`` saying why, elsewhere),
    False never. ``gradient_checkpointing`` recomputes activations in the backward pass.

    Evaluation every ``eval_every`` steps and at the end; with ``early_stopping_patience`` N,
    training stops after N evaluations in a row without improving ``early_stopping_metric``
    (default: the task's first metric). ``log_dir`` gets ``log.jsonl`` (and TensorBoard files when
    installed; :mod:`~peftlab.train.run_log`).

    Checkpoints (:mod:`~peftlab.train.checkpoint`) go to ``checkpoint_dir/step-N`` every
    ``save_every`` steps (default: ``eval_every``) and ``checkpoint_dir/final`` at the end: the
    adapter as ``save_fn(dir)`` writes it (default: :func:`save_trainable`) and the trainer's state;
    the ``keep_checkpoints`` newest ``step-N`` are kept. ``resume_from`` (a checkpoint folder)
    continues that run exactly: same data order, random draws, optimizer, schedule and methods'
    training state, so the loss curve equals an uninterrupted run's.
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
        lr_scheduler: str = "linear",
        warmup_steps: int | None = None,
        save_every: int | None = None,
        keep_checkpoints: int = 3,
        gradient_checkpointing: bool = False,
        bf16: bool | None = None,
        early_stopping_patience: int | None = None,
        early_stopping_metric: str | None = None,
        log_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
        processes: OneProcess | None = None,
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
        if save_every is not None and (save_every < 1 or checkpoint_dir is None):
            raise ValueError(f"save_every must be >= 1 and needs checkpoint_dir, got {save_every} "
                             f"with checkpoint_dir={checkpoint_dir}")
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
        if early_stopping_patience is not None and (eval_every is None or eval_loader is None):
            raise ValueError("early stopping needs evaluations: give eval_every and an eval loader")
        if bf16 and bf16_unavailable_reason(device):
            raise ValueError(f"bf16 requested, but {bf16_unavailable_reason(device)}")
        self.model = model
        # Several processes (train/distributed.py): model is DDP over the PeftModel, or FSDP-sharded;
        # only process 0 writes files, logs and the bar; step losses and eval sets are combined.
        self.processes = processes or OneProcess(device)
        # A PeftModel's methods may act during training (core/training.py): loss terms, per-step
        # actions, calibration. The trainer calls the container's protocol, never a method's code.
        self.peft = unwrap(model) if isinstance(unwrap(model), PeftModel) else None
        self.calibration_batches = calibration_batches
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.lr = lr
        self.epochs = epochs
        self.grad_accum = grad_accum
        self.eval_every = eval_every
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.save_fn: SaveFn = save_fn or (lambda d: save_trainable(unwrap(self.model), d))
        self.max_grad_norm = max_grad_norm
        self.progress = progress and self.processes.is_main
        self.device = torch.device(device)
        self.seed = seed
        self.kind = kind
        self.metrics = list(metrics) if metrics is not None else None
        self.mixed_precision = bf16_available(self.device) if bf16 is None else bf16
        self.save_every = save_every if save_every is not None else (eval_every if checkpoint_dir else None)
        self.keep_checkpoints = keep_checkpoints
        self.early_stopping = (early_stopping_patience, early_stopping_metric)
        self.log_dir = Path(log_dir) if log_dir is not None and self.processes.is_main else None
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self._groups(optimizer_groups, weight_decay), lr=lr,
                                           weight_decay=weight_decay)
        self.total_steps = max_steps if max_steps is not None else self._steps_for_epochs()
        self.warmup_steps = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * self.total_steps)
        self.lr_scheduler = lr_scheduler
        self.scheduler = make_scheduler(self.optimizer, lr_scheduler, self.warmup_steps, self.total_steps)

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
        # DDP's wrapper has no generate() and its eval forwards need no collective: the module inside.
        result = evaluate_model(unwrap(self.model), loader, self.device, kind, metrics, self.mixed_precision,
                                gather=self.processes.eval_gather(loader))
        self._sync()
        return result

    # -- training --------------------------------------------------------------------------------

    def _due(self, every: int | None, step: int) -> bool:
        return bool(every) and step % every == 0 and step < self.total_steps  # type: ignore[operator]

    def _settings(self) -> dict[str, Any]:
        """What a run resumed from a checkpoint must share with the run that wrote it."""
        return {"total_steps": self.total_steps, "grad_accum": self.grad_accum, "lr_scheduler": self.lr_scheduler,
                "warmup_steps": self.warmup_steps, "batches_per_epoch": self._batches_per_epoch()}

    def _early_stopper(self) -> EarlyStopping | None:
        patience, metric = self.early_stopping
        if patience is None:
            return None
        return EarlyStopping(metric or self._task(self.eval_loader)[1][0], patience)

    def _hook_states(self) -> dict[str, Any]:
        return {name: self.peft.training_state(name) for name in self.peft.adapters} if self.peft else {}

    def _save_checkpoint(self, name: str, progress: RunProgress, stream: BatchStream,
                         stopper: EarlyStopping | None) -> None:
        """Write checkpoint ``checkpoint_dir/name`` (atomically) and drop the oldest beyond
        ``keep_checkpoints``."""
        if self.checkpoint_dir is None:
            return
        position = stream.position()
        progress.data = {"epoch": position["epoch"], "batches_into_epoch": position["batches_into_epoch"]}
        progress.early_stopping = stopper.state_dict() if stopper is not None else None
        rng = {"generators": capture_rng(), "data_order": position["epoch_start_state"]}

        def fill(folder: Path) -> None:
            self.save_fn(folder)
            save_trainer_state(folder, model=unwrap(self.model), optimizer=self.optimizer, scheduler=self.scheduler,
                               progress=progress.to_json(), rng=rng, hooks=self._hook_states())

        if self.processes.is_main:  # DDP: every process holds the same adapter and optimizer state
            write_checkpoint(self.checkpoint_dir, name, progress.step, fill)
            prune_checkpoints(self.checkpoint_dir, self.keep_checkpoints)
        self.processes.barrier()

    def _restore(self, checkpoint: Path, stream: BatchStream, stopper: EarlyStopping | None) -> RunProgress:
        """Load checkpoint ``checkpoint`` into the model, optimizer, scheduler, methods' training
        state, batch stream and random generators; returns the run's progress at that step."""
        state = load_trainer_state(checkpoint)
        progress = RunProgress.from_json(state["progress"])
        try:
            progress.check_same_settings(self._settings())
        except ValueError as err:
            raise CheckpointError(f"{checkpoint}: {err}") from None
        load_model_tensors(unwrap(self.model), state["tensors"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.peft is not None:
            for name, hook_state in state["hooks"].items():
                self.peft.load_training_state(name, hook_state)
        stream.seek({**progress.data, "epoch_start_state": state["rng"]["data_order"]})
        restore_rng(state["rng"]["generators"])  # after seek, which may draw from the global generator
        if stopper is not None and progress.early_stopping:
            stopper.load_state_dict(progress.early_stopping)
        return progress

    def _clip_gradients(self, params: list[torch.Tensor]) -> float | None:
        """Clip to ``max_grad_norm`` (when set); returns the total gradient norm before clipping."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        if self.max_grad_norm:
            return float(nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        return float(nn.utils.get_total_norm(grads))

    def _train_step(self, stream: BatchStream, params: list[torch.Tensor], kind: str | None,
                    progress: RunProgress, log: RunLog | None, bar: Any) -> str | None:
        """One optimizer step over the next group of micro-batches; returns the task kind."""
        start = time.perf_counter()
        group = stream.next_group()
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum = 0.0
        examples = tokens = 0
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
        mean_loss, examples, tokens = self.processes.step_totals(loss_sum / len(group), examples, tokens)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training loss became {mean_loss} at step {progress.step + 1}")
        grad_norm = self._clip_gradients(params)
        self.optimizer.step()
        self.scheduler.step()
        if self.peft is not None:
            self.peft.on_step()  # before zero_grad: methods may read the gradients
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        seconds = time.perf_counter() - start
        progress.record_step(mean_loss, lr, grad_norm, len(group), examples, tokens, seconds)
        if log is not None:
            per_epoch = self._batches_per_epoch()
            log.write({"step": progress.step, "epoch": progress.micro_batches / per_epoch if per_epoch else None,
                       "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / seconds,
                       "examples_per_s": examples / seconds})
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        return kind

    def _evaluate_at(self, step: int, progress: RunProgress, log: RunLog | None,
                     stopper: EarlyStopping | None) -> dict[str, Any]:
        evaluation = self.evaluate(self.eval_loader)
        progress.eval_history.append({"step": step, **evaluation})
        if log is not None:
            log.write({"step": step, **{f"eval_{k}": v for k, v in evaluation.items()}})
        if stopper is not None:
            stopper.update(step, evaluation)
        return evaluation

    def train(self) -> dict[str, Any]:
        """Run the optimisation (or continue it from ``resume_from``) and return a report.

        Keys: steps, epochs, loss_curve (mean loss of each optimizer step), lr_curve (first
        group's lr at each step), grad_norm_curve (total gradient norm before clipping),
        final_loss, eval (final evaluation or None), eval_history, checkpoints (those kept),
        wall_time_s (this call), train_time_s (this call's optimizer steps only, evaluations and
        checkpoints excluded), train_time_total_s (the whole run's), examples, tokens (non-padding),
        examples_per_s, tokens_per_s, steps_per_s (this call's),
        peak_memory_bytes, peak_memory_method, baseline_memory_bytes, device, mixed_precision,
        trainable_params, lr_scheduler, warmup_steps, gradient_checkpointing, early_stopping
        (None, or metric, best, best_step, stopped), resumed_from and resumed_at_step (None for a
        new run), log_file and log_note (why TensorBoard is off, or None). Curves and counters
        cover the whole run, the part before a resume included; times, throughput and peak memory
        are this call's.
        """
        wall_start = time.perf_counter()
        torch.manual_seed(self.seed)
        self.model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        kind = self.kind
        stream = BatchStream(self.train_loader, self.grad_accum)
        stopper = self._early_stopper()
        progress = RunProgress(settings=self._settings())
        if self.peft is not None:
            self.peft.begin_training(self.total_steps)
        if self.resume_from is not None:
            progress = self._restore(self.resume_from, stream, stopper)
        elif self.peft is not None and self.peft.needs_calibration:
            sample = [to_device(b, self.device) for _, b in zip(range(self.calibration_batches), self.train_loader)]
            self.peft.calibrate(sample)
        resumed_at = progress.step if self.resume_from is not None else None
        start = RunProgress(step=progress.step, examples=progress.examples, tokens=progress.tokens,
                            train_time_s=progress.train_time_s)  # what this call's throughput leaves out
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(RunLog(self.log_dir, resumed_at)) if self.log_dir is not None else None
            bar = tqdm(total=self.total_steps, initial=progress.step, desc="train", unit="step",
                       disable=not self.progress, dynamic_ncols=True)
            with bar, PeakMemory(self.device) as memory:
                while progress.step < self.total_steps and not progress.finished and not (stopper and stopper.stopped):
                    kind = self._train_step(stream, params, kind, progress, log, bar)
                    if self._due(self.eval_every, progress.step) and self.eval_loader is not None:
                        evaluation = self._evaluate_at(progress.step, progress, log, stopper)
                        bar.set_postfix(loss=f"{progress.loss_curve[-1]:.4f}", lr=f"{progress.lr_curve[-1]:.2e}",
                                        eval_loss=f"{evaluation['loss']:.4f}", refresh=False)
                    if self._due(self.save_every, progress.step):
                        self._save_checkpoint(f"step-{progress.step}", progress, stream, stopper)
            final_eval = None
            if progress.finished:  # resumed from the final checkpoint: nothing left to do
                final_eval = next((h for h in reversed(progress.eval_history) if h["step"] == progress.step), None)
            else:
                if self.eval_loader is not None:
                    final_eval = self._evaluate_at(progress.step, progress, log, None)
                progress.finished = True
                self._save_checkpoint("final", progress, stream, stopper)
        step = progress.step
        train_time = progress.train_time_s - start.train_time_s
        per_epoch = self._batches_per_epoch()
        return {
            "steps": step,
            "epochs": progress.micro_batches / per_epoch if per_epoch else None,
            "loss_curve": progress.loss_curve,
            "lr_curve": progress.lr_curve,
            "grad_norm_curve": progress.grad_norm_curve,
            "final_loss": progress.loss_curve[-1] if progress.loss_curve else None,
            "eval": final_eval,
            "eval_history": progress.eval_history,
            "checkpoints": [str(p) for p in reversed(checkpoint_folders(self.checkpoint_dir))]
            if self.checkpoint_dir is not None else [],
            "wall_time_s": time.perf_counter() - wall_start,
            "train_time_s": train_time,
            "train_time_total_s": progress.train_time_s,
            "examples": progress.examples,
            "tokens": progress.tokens,
            "examples_per_s": (progress.examples - start.examples) / train_time if train_time else 0.0,
            "tokens_per_s": (progress.tokens - start.tokens) / train_time if train_time else 0.0,
            "steps_per_s": (step - start.step) / train_time if train_time else 0.0,
            "peak_memory_bytes": memory.peak_bytes,
            "peak_memory_method": memory.method,
            "baseline_memory_bytes": memory.baseline_bytes,
            "device": str(self.device),
            "mixed_precision": "bf16" if self.mixed_precision else None,
            "trainable_params": self.trainable_params,
            "lr_scheduler": self.lr_scheduler,
            "warmup_steps": self.warmup_steps,
            "gradient_checkpointing": self.gradient_checkpointing,
            "early_stopping": {**stopper.state_dict(), "patience": stopper.patience} if stopper else None,
            "resumed_from": str(self.resume_from) if self.resume_from is not None else None,
            "resumed_at_step": resumed_at,
            "log_file": str(log.path) if log is not None else None,
            "log_note": log.note if log is not None else None,
        }

    def _batches_per_epoch(self) -> int | None:
        try:
            return len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:
            return None
