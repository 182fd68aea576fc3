"""Several adapters trained over one frozen base in shared mixed batches (multi-PEFT training, seed
002 §6.1.3).

A *lane* is one adapter and everything a run of its own would have: a
:class:`~peftlab.train.trainer.Trainer` over its :class:`~peftlab.train.multi_heads.TaskView` (its
optimizer state, lr schedule, number of steps, gradient accumulation and clipping, data loader and
evaluation), and its own stream of micro-batches. :class:`MultiTrainer` steps every lane together:
each joint micro-step takes the next micro-batch of every lane still training, runs them through the
base in one mixed batch (row i routed to its lane's adapter, ``adapter_names``) or in passes of at
most ``max_rows`` rows, and backpropagates Σ over lanes of

    L_a = (1 / G_a) · (1 / n_a) · Σ_{rows i of lane a} ℓ_a(logits_i[:k_a], y_i)

(n_a the rows of lane a's micro-batch, G_a its micro-batches per optimizer step, ℓ_a its task's
loss, k_a its head's width). Rows of lane a reach only adapter a's parameters, so adapter a's
gradient is that of its own mean loss, as when it trains alone; after its G_a-th micro-batch the
lane clips its own gradient norm and steps its own optimizer and schedule. Lanes may have different
batch sizes, step counts and gradient accumulation: a lane that is done leaves the joint batch.

With dropout off, each adapter ends as it would alone (same seed, data, batch and settings) up to
float rounding (``tests/test_multi_train.py``). With dropout on, masks are drawn over the joint
batch, so an adapter sees other draws (of the same distribution) than alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.core.model import PeftModel
from peftlab.train.data_order import BatchStream
from peftlab.train.evaluation import autocast_for, loss_from_logits, output_field, to_device
from peftlab.train.memory import PeakMemory
from peftlab.train.multi_batch import Batch, join_inputs, split_passes
from peftlab.train.trainer import Trainer


@dataclass
class Lane:
    """One adapter of a joint run: its ``name`` in the shared :class:`PeftModel`, its ``trainer``
    (built over a :class:`~peftlab.train.multi_heads.TaskView` of that adapter), its task ``kind``
    and head ``width`` (logits read per row)."""

    name: str
    trainer: Trainer
    kind: str
    width: int
    step: int = 0
    loss_curve: list[float] = field(default_factory=list)
    lr_curve: list[float] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    _stream: BatchStream | None = None
    _pending: list[Batch] = field(default_factory=list)
    _group_size: int = 0
    _loss_sum: float = 0.0

    @property
    def done(self) -> bool:
        """True once the lane has taken all its optimizer steps."""
        return self.step >= self.trainer.total_steps

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this lane's optimizer updates."""
        return [p for g in self.trainer.optimizer.param_groups for p in g["params"]]

    def next_micro_batch(self) -> Batch:
        """The next micro-batch of the lane's current optimizer step (starting a new group of
        ``grad_accum`` micro-batches when the last one is used up)."""
        if self._stream is None:
            self._stream = BatchStream(self.trainer.train_loader, self.trainer.grad_accum)
        if not self._pending:
            self._pending = list(self._stream.next_group())
            self._group_size = len(self._pending)
            self._loss_sum = 0.0
        return self._pending.pop(0)

    def objective_part(self, summed: torch.Tensor, rows_in_micro_batch: int) -> torch.Tensor:
        """Record Σ of the loss over some rows of the current micro-batch (which has
        ``rows_in_micro_batch`` rows) and return their share of the lane's objective,
        summed / (n · G): the micro-batch's mean loss over the G micro-batches of one step."""
        self._loss_sum += float(summed.detach()) / rows_in_micro_batch
        return summed / (rows_in_micro_batch * self._group_size)

    @property
    def group_complete(self) -> bool:
        """True when every micro-batch of the current optimizer step has been through backward."""
        return not self._pending

    def optimizer_step(self) -> float:
        """Clip this lane's gradient, step its optimizer and schedule, record the step's mean loss
        (returned) and lr."""
        trainer = self.trainer
        mean_loss = self._loss_sum / self._group_size
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"adapter {self.name!r}: training loss became {mean_loss} at step {self.step + 1}")
        lr = trainer.optimizer.param_groups[0]["lr"]
        if trainer.max_grad_norm:
            nn.utils.clip_grad_norm_(self.params, trainer.max_grad_norm)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.loss_curve.append(mean_loss)
        self.lr_curve.append(lr)
        return mean_loss


class MultiTrainer:
    """Train the lanes of ``pm`` together (see the module docstring).

    ``max_rows`` caps the rows of one forward pass (None: every lane's micro-batch in one pass; a
    cap keeps activation memory near one run's while rows of several adapters still share passes).
    ``pad_token_id`` and ``padding_side`` are the tokenizer's (the lanes' loaders pad the same way).
    """

    def __init__(self, pm: PeftModel, lanes: Sequence[Lane], pad_token_id: int, padding_side: str = "right",
                 max_rows: int | None = None, progress: bool = True, seed: int = 0) -> None:
        """Check the lanes (distinct adapters of ``pm``, one device) and keep the settings."""
        if not lanes:
            raise ValueError("a joint run needs at least one adapter")
        names = [lane.name for lane in lanes]
        missing = [n for n in names if n not in pm.adapters]
        if missing or len(set(names)) != len(names):
            raise ValueError(f"lanes must name distinct adapters of the model; got {names}, adapters {pm.adapters}")
        devices = {lane.trainer.device for lane in lanes}
        if len(devices) != 1:
            raise ValueError(f"every lane must train on one device, got {sorted(map(str, devices))}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.pm = pm
        self.lanes = list(lanes)
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.max_rows = max_rows
        self.progress = progress
        self.seed = seed
        self.device = devices.pop()
        self.mixed_precision = self.lanes[0].trainer.mixed_precision

    def _forward_backward(self, parts: list, live: list[Lane]) -> None:
        """One forward pass over ``parts`` (rows routed to their lanes' adapters) and the backward
        of Σ_lanes L_a restricted to these rows."""
        inputs = join_inputs(parts, self.pad_token_id, self.padding_side)
        routes = [live[p.lane].name for p in parts for _ in range(p.rows)]
        with autocast_for(self.device, self.mixed_precision):
            logits = output_field(self.pm(**inputs, adapter_names=routes), "logits", 0)
        total = logits.new_zeros((), dtype=torch.float32)
        for part in parts:
            lane = live[part.lane]
            rows = logits[part.start:part.start + part.rows, :lane.width]
            summed = loss_from_logits(rows, part.batch["labels"], lane.kind, reduction="sum")
            total = total + lane.objective_part(summed, part.of)
        total.backward()

    def train(self) -> dict[str, Any]:
        """Run every lane to its last step; returns the joint report: ``adapters`` ({name: steps,
        loss_curve, lr_curve, final_loss, eval (final evaluation or None), eval_history, examples,
        tokens, trainable_params}), ``micro_steps`` (joint micro-steps), ``forward_passes``,
        ``wall_time_s``, ``train_time_s`` (evaluations excluded), ``peak_memory_bytes`` (above the
        memory in use when training began), ``peak_memory_method``, ``baseline_memory_bytes``,
        ``device``, ``mixed_precision``, ``max_rows``."""
        wall_start = time.perf_counter()
        torch.manual_seed(self.seed)
        self.pm.train()
        train_time = 0.0
        micro_steps = passes = 0
        total = sum(lane.trainer.total_steps for lane in self.lanes)
        bar = tqdm(total=total, desc=f"train {len(self.lanes)} adapters", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        with bar, PeakMemory(self.device) as memory:
            while not all(lane.done for lane in self.lanes):
                start = time.perf_counter()
                live = [lane for lane in self.lanes if not lane.done]
                micro = []
                for i, lane in enumerate(live):
                    batch = to_device(lane.next_micro_batch(), self.device)
                    lane.examples += int(batch["labels"].shape[0])
                    lane.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                    micro.append((i, batch))
                for parts in split_passes(micro, self.max_rows):
                    self._forward_backward(parts, live)
                    passes += 1
                micro_steps += 1
                stepped = [lane for lane in live if lane.group_complete]
                for lane in stepped:
                    lane.optimizer_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                train_time += time.perf_counter() - start
                bar.update(len(stepped))
                bar.set_postfix({lane.name: f"{lane.loss_curve[-1]:.4f}" for lane in self.lanes if lane.loss_curve},
                                refresh=False)
                for lane in stepped:
                    every = lane.trainer.eval_every
                    if every and lane.step % every == 0 and not lane.done and lane.trainer.eval_loader is not None:
                        lane.eval_history.append({"step": lane.step, **lane.trainer.evaluate()})
        adapters = {}
        for lane in self.lanes:
            final = lane.trainer.evaluate() if lane.trainer.eval_loader is not None else None
            if final is not None:
                lane.eval_history.append({"step": lane.step, **final})
            adapters[lane.name] = {
                "steps": lane.step, "loss_curve": lane.loss_curve, "lr_curve": lane.lr_curve,
                "final_loss": lane.loss_curve[-1], "eval": final, "eval_history": lane.eval_history,
                "examples": lane.examples, "tokens": lane.tokens, "trainable_params": lane.trainer.trainable_params,
            }
        return {
            "adapters": adapters, "micro_steps": micro_steps, "forward_passes": passes,
            "wall_time_s": time.perf_counter() - wall_start, "train_time_s": train_time,
            "examples_per_s": sum(lane.examples for lane in self.lanes) / train_time if train_time else 0.0,
            "peak_memory_bytes": memory.peak_bytes, "peak_memory_method": memory.method,
            "baseline_memory_bytes": memory.baseline_bytes, "device": str(self.device),
            "mixed_precision": "bf16" if self.mixed_precision else None, "max_rows": self.max_rows,
        }
