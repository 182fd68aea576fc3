"""Setting up a multi-adapter run (:mod:`peftlab.train.multi`): which methods can share a batch, one
base model with every task's head, the adapters (each initialised from its own seed) and their lanes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import peftlab
from peftlab.core.config import (
    AdapterConfig,
    BaseChangingConfig,
    UnionConfig,
    as_config,
    config_parts,
    union_parts,
)
from peftlab.core.model import PeftModel
from peftlab.core.registry import get_method
from peftlab.train.batching import make_loader
from peftlab.train.examples import Examples
from peftlab.train.heads import head_module_names
from peftlab.train.multi import Lane
from peftlab.train.multi_heads import TaskView, install_task_head
from peftlab.train.trainer import Trainer
from peftlab.zoo.seeding import seeded

#: Task kinds a joint run trains (a head per task, read per row); the generative kinds are not yet.
JOINT_KINDS = ("classification", "regression")


@dataclass
class AdapterRun:
    """One adapter of a joint run, with what ``peftlab train`` would be given to train it alone:
    ``method`` (a method string or config), ``train`` / ``eval`` examples, ``lr``, ``batch_size``,
    ``max_length`` (tokens per example), ``loraplus_ratio``, ``weight_decay``, ``seed`` (the
    adapter's init and its data order) and ``trainer``: further keyword arguments of
    :class:`~peftlab.train.trainer.Trainer` (``max_steps``, ``epochs``, ``warmup_ratio``,
    ``grad_accum``, ``max_grad_norm``, ``lr_scheduler``, ``eval_every``...). ``task_name`` and
    ``lr_source`` only go into the reports."""

    name: str
    method: Any
    train: Examples
    eval: Examples | None
    lr: float
    batch_size: int = 32
    max_length: int = 128
    loraplus_ratio: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    trainer: dict[str, Any] = field(default_factory=dict)
    task_name: str = ""
    lr_source: str = ""

    @property
    def width(self) -> int:
        """Outputs of this adapter's task head (classes, 1 for regression)."""
        return int(self.train.num_labels or 0)


def check_shareable(methods: dict[str, Any]) -> None:
    """Refuse, naming the adapter and why, the methods that cannot train in a shared mixed batch:
    config forms that change the base (``qlora``), methods that act during training (their per-step
    hooks run per model, not per adapter: AdaLoRA, DyLoRA), methods that rewrite the model call
    without batching per row (``per_row=False`` with a model-level site: UniPELT's gated prefix), and
    two different model-level methods (a prefix and a prompt cannot share one call). ``methods``
    maps adapter names to method strings or configs."""
    model_level: dict[str, str] = {}
    for name, method in methods.items():
        cfg = as_config(method)
        parts = config_parts(cfg)
        if any(isinstance(p, BaseChangingConfig) for p in parts):
            raise ValueError(f"adapter {name!r}: {cfg.to_string()} changes the base model (quantizes it), "
                             "and the adapters of a joint run share one base; train it alone")
        for part in [*parts, *union_parts(cfg)]:
            spec = get_method(part.method)
            if spec.training is not None:
                raise ValueError(f"adapter {name!r}: {spec.name} acts during training (per-step hooks such as rank "
                                 "budgets or rank sampling) and cannot train beside other adapters; train it alone")
            if "model" in spec.sites and not spec.per_row:
                raise ValueError(f"adapter {name!r}: {spec.name} rewrites the whole model call and does not batch "
                                 "per row (per_row=False in peftlab methods), so it cannot share a mixed batch; "
                                 "train it alone")
        for part in union_parts(cfg):
            if "model" in get_method(part.method).sites:
                model_level[name] = part.method
    if len(set(model_level.values())) > 1:
        listed = ", ".join(f"{n} ({m})" for n, m in model_level.items())
        raise ValueError(f"adapters {listed} use different model-level methods, which cannot share one call; "
                         "a joint run may hold one model-level method (and any number of the others)")


def _head_shape(examples: Examples) -> tuple[str, int]:
    if examples.kind not in JOINT_KINDS:
        raise ValueError(f"task kind {examples.kind!r} cannot train in a joint run yet "
                         f"(kinds: {', '.join(JOINT_KINDS)}); train it alone")
    return examples.kind, int(examples.num_labels or 1)


TaskHeads = dict[str, dict[str, nn.Module]]  # {adapter: {head module name: its task's head}}


def load_shared_base(model_name: str, runs: Sequence[AdapterRun]) -> tuple[nn.Module, Any, TaskHeads]:
    """The base of a joint run, its tokenizer, and each adapter's task head ({adapter: {module name:
    head}}), from :func:`peftlab.zoo.load`.

    The base carries the widest task's head (classification with the most classes, else
    regression); a task whose head has another shape gets the head a base loaded for it alone has
    (the zoo seeds fresh heads), after checking that every other weight of that load equals the
    shared base's (else one base cannot serve both tasks)."""
    shapes = {run.name: _head_shape(run.train) for run in runs}
    classes = [k for kind, k in shapes.values() if kind == "classification"]
    base_shape = ("classification", max(classes)) if classes else ("regression", 1)
    model, tokenizer = peftlab.zoo.load(model_name, task=base_shape[0], num_labels=base_shape[1])
    heads = head_module_names(model)
    if not heads:
        raise ValueError(f"{type(model).__name__} has no task head module (looked for {model.__class__.__name__}'s "
                         "children beside the backbone); a joint run gives each adapter its own head")
    loaded: dict[tuple[str, int], dict[str, nn.Module]] = {base_shape: {h: model.get_submodule(h) for h in heads}}
    base_state = {n: p for n, p in model.named_parameters() if not any(n.startswith(h + ".") for h in heads)}
    for shape in dict.fromkeys(shapes.values()):
        if shape in loaded:
            continue
        other, _ = peftlab.zoo.load(model_name, task=shape[0], num_labels=shape[1])
        for n, p in other.named_parameters():
            if n in base_state and not torch.equal(p, base_state[n]):
                raise ValueError(f"{model_name} loaded for {shape[0]} with {shape[1]} output(s) differs from the "
                                 f"shared base in {n!r} (not only in its head), so one base cannot serve these tasks")
        loaded[shape] = {h: other.get_submodule(h) for h in heads}
    return model, tokenizer, {name: loaded[shape] for name, shape in shapes.items()}


def _with_heads(method: Any, heads: list[str]) -> dict[str, Any]:
    """``modules_to_save`` for the task heads unless the method already names what to save."""
    cfg = as_config(method)
    first = cfg.parts[0] if isinstance(cfg, UnionConfig) else cfg
    given = isinstance(first, AdapterConfig) and first.modules_to_save
    return {} if given else {"modules_to_save": heads}


def add_adapters(model: nn.Module, runs: Sequence[AdapterRun], task_heads: TaskHeads) -> PeftModel:
    """Attach every run's adapter to ``model`` (each under ``seeded(run.seed)``, so its init is the
    one a run of its own with that seed gets), put its own task head in its head copy, and make all
    of them trainable."""
    check_shareable({run.name: run.method for run in runs})
    pm: nn.Module = model
    for run in runs:
        overrides = _with_heads(run.method, list(task_heads[run.name]))
        with seeded(run.seed):
            pm = peftlab.apply(pm, run.method, adapter_name=run.name, **overrides)
        if overrides:
            for module_name, head in task_heads[run.name].items():
                install_task_head(pm, run.name, module_name, head)
    assert isinstance(pm, PeftModel)
    pm.set_adapter([run.name for run in runs])
    return pm


def make_lanes(pm: PeftModel, runs: Sequence[AdapterRun], tokenizer: Any, device: str | torch.device) -> list[Lane]:
    """One :class:`~peftlab.train.multi.Lane` per run: its loaders (shuffled with its seed), its
    AdamW groups (``peftlab.param_groups`` of its adapter only) and a Trainer over its TaskView."""
    lanes = []
    for run in runs:
        train_loader = make_loader(run.train, tokenizer, run.batch_size, run.max_length, shuffle=True, seed=run.seed)
        eval_loader = make_loader(run.eval, tokenizer, run.batch_size, run.max_length) if run.eval is not None else None
        groups = peftlab.param_groups(pm.adapter_modules[run.name], lr=run.lr, loraplus_ratio=run.loraplus_ratio,
                                      weight_decay=run.weight_decay)
        trainer = Trainer(TaskView(pm, run.name, run.width), train_loader, eval_loader, optimizer_groups=groups,
                          lr=run.lr, weight_decay=run.weight_decay, progress=False, device=device, seed=run.seed,
                          kind=run.train.kind, metrics=run.train.metrics, **run.trainer)
        lanes.append(Lane(run.name, trainer, run.train.kind, run.width))
    return lanes
