"""A whole joint run of several adapters (what ``peftlab train`` does with several ``--method`` /
``--task`` pairs): one base and every adapter (:mod:`peftlab.train.multi_setup`), each adapter's
metric at init, joint training (:class:`~peftlab.train.multi.MultiTrainer`), then per adapter its
files and ``report.json`` in ``OUT/<name>/``, and the joint report and ``loss_curves.png`` in ``OUT``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.core.model import PeftModel
from peftlab.train.dropout import disable_dropout
from peftlab.train.multi import Lane, MultiTrainer
from peftlab.train.multi_heads import narrowed_heads
from peftlab.train.multi_report import plot_loss_curves
from peftlab.train.multi_setup import AdapterRun, add_adapters, load_shared_base, make_lanes
from peftlab.train.report import write_report
from peftlab.train.task_setup import task_report
from peftlab.train.trainer import enable_gradient_checkpointing


@dataclass
class JointRun:
    """A base with every run's adapter and lane, ready to train (:func:`prepare_joint_run`)."""

    model_name: str
    pm: PeftModel
    tokenizer: Any
    runs: list[AdapterRun]
    lanes: list[Lane]
    heads: dict[str, dict[str, int]]  # {adapter: {head module: its task's width}}
    dropout_off: bool


def prepare_joint_run(model_name: str, runs: Sequence[AdapterRun], device: str | torch.device,
                      no_dropout: bool = False, gradient_checkpointing: bool = False) -> JointRun:
    """Load the shared base (:func:`~peftlab.train.multi_setup.load_shared_base`), turn its dropout
    off when asked, attach every adapter with its task head and build the lanes on ``device``."""
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must differ, got {names}")
    model, tokenizer, task_heads = load_shared_base(model_name, runs)
    if no_dropout:
        disable_dropout(model)
    pm = add_adapters(model, runs, task_heads)
    pm.to(device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(pm)  # a ValueError when no layer of the model checkpoints
    lanes = make_lanes(pm, runs, tokenizer, device)
    heads = {run.name: {h: run.width for h in task_heads[run.name]} for run in runs}
    return JointRun(model_name, pm, tokenizer, list(runs), lanes, heads, no_dropout)


def _adapter_report(joint: JointRun, run: AdapterRun, lane_result: dict[str, Any], before: dict[str, Any] | None,
                    lane: Lane) -> dict[str, Any]:
    with narrowed_heads(joint.pm, run.name, joint.heads[run.name]):  # counts of the task's own head
        counts = joint.pm.report(run.name)
    metric = run.train.metrics[0]
    after = lane_result["eval"]
    report = {
        "model": joint.model_name, "task": run.task_name, "method": str(run.method), "adapter": run.name,
        "method_resolved": counts.get("method"),
        **{k: counts.get(k) for k in ("trainable_params", "changed_params", "total_params", "ranks", "bytes_on_disk")},
        "adapter_report": counts, "head_modules": list(joint.heads[run.name]),
        "metric_names": list(run.train.metrics), "metric": metric,
        "metric_before": (before or {}).get(metric), "metric_after": (after or {}).get(metric),
        "metrics_before": before, "metrics_after": after,
        "metrics_before_note": "the adapter at init: for methods that start as the identity, the base with the "
                               "task's fresh head",
        "train_examples": len(run.train), "eval_examples": len(run.eval) if run.eval is not None else 0,
        "label_names": run.train.label_names, "kind": run.train.kind,
        "batch_size": run.batch_size, "max_length": run.max_length, "lr": run.lr, "lr_source": run.lr_source,
        "loraplus_ratio": run.loraplus_ratio, "seed": run.seed, "trainer_options": dict(run.trainer),
        # The optimizer also holds the widened head's zero rows: the counts above are the adapter's own.
        **{k: v for k, v in lane_result.items() if k not in ("eval", "trainable_params")},
        "joint_run": {"adapters": [r.name for r in joint.runs], "report": "../report.json"},
        "dropout": "off" if joint.dropout_off else "on",
    }
    if run.eval is not None:
        loaders = (lane.trainer.train_loader, lane.trainer.eval_loader)
        report.update(task_report(run.train, run.eval, loaders, after))
    return report


def train_jointly(joint: JointRun, out: str | Path, max_rows: int | None = None, progress: bool = True,
                  seed: int = 0, plot: bool = True) -> dict[str, Any]:
    """Evaluate every adapter at init, train them together, save each into ``out/<name>`` (adapter
    files with its task's own head, and its ``report.json``) and return the joint report (written
    by the caller as ``out/report.json``); with ``plot``, ``out/loss_curves.png`` plots the curves.
    ``max_rows``: rows per forward pass (None: one pass per micro-step; ``peftlab train`` passes the
    largest adapter batch, :func:`~peftlab.train.multi_options.max_rows_for`)."""
    out = Path(out)
    before = {lane.name: lane.trainer.evaluate() if lane.trainer.eval_loader is not None else None
              for lane in joint.lanes}
    trainer = MultiTrainer(joint.pm, joint.lanes, joint.tokenizer.pad_token_id,
                           getattr(joint.tokenizer, "padding_side", "right") or "right",
                           max_rows=max_rows, progress=progress, seed=seed)
    result = trainer.train()
    adapters: dict[str, dict[str, Any]] = {}
    for run, lane in zip(joint.runs, joint.lanes):
        folder = out / run.name
        with narrowed_heads(joint.pm, run.name, joint.heads[run.name]):
            joint.pm.save(folder, adapter_name=run.name)
        report = _adapter_report(joint, run, result["adapters"][run.name], before[run.name], lane)
        write_report(folder, report)
        adapters[run.name] = {k: report[k] for k in ("method", "task", "steps", "lr", "metric", "metric_before",
                                                     "metric_after", "loss_curve", "trainable_params")}
        adapters[run.name]["dir"] = str(folder)
    png = plot_loss_curves(adapters, out / "loss_curves.png") if plot else None
    return {
        "model": joint.model_name, "out": str(out), "adapters": adapters,
        **{k: v for k, v in result.items() if k != "adapters"},
        "dropout": "off" if joint.dropout_off else "on", "plot": str(png) if png else None,
    }
