"""One run of ``peftlab bench methods``: one method (or full fine-tuning) on one model, one task,
one seed, under the benchmark's shared budget; returns one JSON-able record (a line of
``results.jsonl``).

A run loads its data (a registered task, the synthetic smoke task or the user's own files, through
``peftlab train``'s data code), builds a fresh model (the zoo's, or a tiny random one with a hash
tokenizer), checks that the method applies (``NotApplicableError`` makes the record
``not_applicable``), evaluates the untrained model, applies the method's default config with the
task head in ``modules_to_save`` (as ``peftlab train`` does), trains ``steps`` optimizer steps at the
method's declared ``default_lr`` with :class:`peftlab.train.trainer.Trainer`, evaluates again and
records the counts of seed 001 §12 (trainable, changed, rank), memory, time and the loss curve.
Every source of randomness is seeded from the run's seed, so a run does not depend on which worker
ran it or what ran there before.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

#: The pseudo-method of the reference row: every parameter trained (Table III's "FT").
FULL = "full"
#: Peak learning rate of full fine-tuning (the methods use their declared ``default_lr``).
FULL_FT_LR = 5e-5
MB = 1024 * 1024


def load_examples(task: dict[str, Any], budget: dict[str, Any]) -> tuple[Any, Any]:
    """Train and eval :class:`~peftlab.train.examples.Examples` of a task: ``source`` is
    ``registered`` (a name of ``peftlab.train.tasks.TASKS``), ``smoke`` (the synthetic task) or
    ``file`` (the user's ``--data`` / ``--eval-data``, read by ``peftlab train``'s own code). The
    subsets are drawn with seed 0: every run of a benchmark sees the same data."""
    from peftlab.bench.smoke import smoke_task
    from peftlab.train.data import load_task

    train_limit, eval_limit = budget.get("train_limit"), budget.get("eval_limit")
    if task["source"] == "smoke":
        return smoke_task("train", train_limit or 128), smoke_task("eval", eval_limit or 64)
    if task["source"] == "registered":
        return (load_task(task["name"], "train", limit=train_limit, seed=0),
                load_task(task["name"], "eval", limit=eval_limit, seed=0))
    from peftlab.train.cli import _load_data  # peftlab train's rules for --data, reused as they are

    args = argparse.Namespace(data=task["data"], eval_data=task.get("eval_data"), text_cols=task["text_cols"],
                              label_col=task["label_col"], label_kind=task.get("label_kind", "auto"),
                              train_limit=train_limit, eval_limit=eval_limit, seed=0, task=None)
    train, evals, _ = _load_data(args)
    return train, evals


def load_model(name: str, kind: str, num_labels: int) -> tuple[Any, Any]:
    """A fresh ``(model, tokenizer)`` with a head for the task: ``tiny-<kind>`` models are built
    in-process (:mod:`peftlab.bench.smoke`), anything else comes from ``peftlab.zoo.load`` (a zoo
    name or a local Hugging Face directory). Heads are initialised with a fixed seed."""
    from peftlab.bench.smoke import is_tiny, tiny_classifier, tiny_tokenizer

    if is_tiny(name):
        return tiny_classifier(name, kind, num_labels), tiny_tokenizer(name)
    import peftlab

    return peftlab.zoo.load(name, task=kind, num_labels=num_labels if kind == "classification" else None)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def not_applicable_reason(method: str, model: Any) -> str | None:
    """The ``NotApplicableError`` message when a part of ``method`` (a union's or hybrid's parts
    included) declares a need ``model`` does not meet, else None."""
    from peftlab.core.config import adapter_method, parse_method_string, union_parts
    from peftlab.core.registry import NotApplicableError, get_method

    try:
        for part in union_parts(parse_method_string(method)):
            get_method(adapter_method(part)).check_applicable(model)
    except NotApplicableError as err:
        return str(err)
    return None


def method_name(method: str) -> str:
    """The registered name(s) of a method string: ``lora`` for ``lora[r=8]``, ``lora+prefix`` for a
    union, :data:`FULL` for full fine-tuning (the string itself when it does not parse)."""
    from peftlab.core.config import config_parts, parse_method_string

    if method == FULL:
        return FULL
    try:
        return "+".join(part.method for part in config_parts(parse_method_string(method)))
    except ValueError:
        return method


def method_family(method: str) -> str:
    """The registry's family of a method string (``union`` for a union, ``full`` for :data:`FULL`)."""
    from peftlab.core.registry import get_method

    name = method_name(method)
    if name == FULL or "+" in name:
        return "full" if name == FULL else "union"
    try:
        return get_method(name).family
    except ValueError:
        return ""


def _rank_max(ranks: Any) -> int | None:
    values = [v for v in (ranks or {}).values() if isinstance(v, int)]
    return max(values) if values else None


def apply_method(job: dict[str, Any], model: Any) -> tuple[Any, list[dict[str, Any]] | None, float, dict[str, Any]]:
    """The job's method on ``model`` as a benchmark run trains it (default config, the task head in
    ``modules_to_save``): the trained module, its optimizer groups, its lr and its counts."""
    import peftlab
    from peftlab.core.registry import get_method
    from peftlab.core.config import adapter_method, config_parts, parse_method_string
    from peftlab.train.heads import head_module_names

    if job["method"] == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        counts = {"config_resolved": FULL, "trainable_params": n, "changed_params": n,
                  "base_params": n, "rank_max": None}
        return model, None, float(job["budget"].get("full_lr", FULL_FT_LR)), counts
    first = config_parts(parse_method_string(job["method"]))[0]
    spec = get_method(adapter_method(first))
    heads = head_module_names(model)
    overrides = {"modules_to_save": heads} if heads and "modules_to_save" not in job["method"] else {}
    pm = peftlab.apply(model, job["method"], **overrides)
    report = pm.report()
    counts = {"config_resolved": report["method"], "trainable_params": report["trainable_params"], "changed_params": report["changed_params"],
              "base_params": report["base_params"], "rank_max": _rank_max(report.get("ranks")),
              "bytes_on_disk": report.get("bytes_on_disk")}
    return pm, peftlab.param_groups(pm, lr=spec.default_lr), spec.default_lr, counts


@dataclass
class Prepared:
    """What a job starts from: its device, data, fresh model and tokenizer, the training loader
    (None when the method does not apply) and the ``NotApplicableError`` message if it does not."""

    device: Any
    train: Any
    evals: Any
    model: Any
    tokenizer: Any
    train_loader: Any
    not_applicable: str | None


def prepare(job: dict[str, Any]) -> Prepared:
    """Seed every generator from the job's seed, load its task's data and a fresh model, check that
    the method applies, and make the training loader (the budget's batch size and max length)."""
    import torch

    from peftlab.train.data import make_loader

    budget, seed = job["budget"], int(job["seed"])
    seed_everything(seed)
    train_ex, eval_ex = load_examples(job["task"], budget)
    model, tokenizer = load_model(job["model"], train_ex.kind, train_ex.num_labels)
    reason = None if job["method"] == FULL else not_applicable_reason(job["method"], model)
    loader = None if reason is not None else make_loader(train_ex, tokenizer, budget["batch_size"],
                                                         budget["max_length"], shuffle=True, seed=seed)
    return Prepared(torch.device(job.get("device", "cpu")), train_ex, eval_ex, model, tokenizer, loader, reason)


def _execute(job: dict[str, Any], record: dict[str, Any]) -> None:
    """Fill ``record`` with the run's results (raises on failure, ``record`` keeps what it got)."""
    from peftlab.train.data import make_loader
    from peftlab.train.evaluation import evaluate_model
    from peftlab.train.trainer import Trainer

    budget, seed = job["budget"], int(job["seed"])
    run = prepare(job)
    train_ex, eval_ex, model, device, train_loader = run.train, run.evals, run.model, run.device, run.train_loader
    metric = train_ex.metrics[0]
    record.update(metric=metric, metric_names=list(train_ex.metrics), kind=train_ex.kind,
                  train_examples=len(train_ex), eval_examples=len(eval_ex),
                  weights_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / MB)
    if run.not_applicable is not None:
        record.update(status="not_applicable", error=run.not_applicable)
        return
    eval_loader = make_loader(eval_ex, run.tokenizer, budget.get("eval_batch_size", 64), budget["max_length"])
    model.to(device)
    before = evaluate_model(model, eval_loader, device)
    seed_everything(seed)  # the adapter's initialisation
    net, groups, lr, counts = apply_method(job, model)
    record.update(counts, lr=lr, metrics_before=before, metric_before=before.get(metric))
    record["trainable_pct"] = 100.0 * counts["trainable_params"] / max(1, counts["base_params"])
    trainer = Trainer(net, train_loader, eval_loader, optimizer_groups=groups, lr=lr, max_steps=budget["steps"],
                      warmup_ratio=budget.get("warmup_ratio", 0.06), progress=False, device=device, seed=seed)
    result = trainer.train()
    after = result["eval"] or {}
    record.update(
        status="ok", metrics_after=after, metric_after=after.get(metric),
        loss_curve=result["loss_curve"], steps=result["steps"], train_time_s=result["train_time_s"],
        tokens_per_s=result["tokens_per_s"], examples_per_s=result["examples_per_s"],
        peak_memory_mb=result["peak_memory_bytes"] / MB, memory_method=result["peak_memory_method"],
        baseline_memory_mb=result["baseline_memory_bytes"] / MB, device=result["device"],
        mixed_precision=result["mixed_precision"], optimizer_trainable=result["trainable_params"],
    )


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job and return its record. Never raises for a failing method: the record's
    ``status`` is ``ok``, ``not_applicable`` or ``failed`` (with the error and a traceback tail).
    A ``--compare-peft`` job (``job_kind`` ``peft_compare``) goes to :mod:`peftlab.bench.compare_peft`."""
    from peftlab.bench.compare_peft import COMPARE, run_compare

    if job.get("job_kind") == COMPARE:
        return run_compare(job)
    return recorded(job, _execute)


def recorded(job: dict[str, Any], fill: Callable[[dict[str, Any], dict[str, Any]], None],
             statuses: dict[type[Exception], str] | None = None, **fields: Any) -> dict[str, Any]:
    """A job's record: its identity and ``fields``, then ``fill(job, record)`` (with the job's torch
    threads), its wall time and end. ``fill`` never makes this raise: an exception of a type in
    ``statuses`` sets that status with its message, any other ``failed`` with its type and message;
    both keep a traceback tail."""
    import torch

    threads = int(job.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    record: dict[str, Any] = {
        **fields, "method": method_name(job["method"]), "family": method_family(job["method"]), "config": job["method"],
        "model": job["model"],
        "task": job["task"]["name"], "seed": int(job["seed"]), "budget": job["budget"], "status": "failed",
        "error": None, "threads": torch.get_num_threads(), "pid": os.getpid(), "host": platform.node(),
    }
    start = time.perf_counter()
    try:
        fill(job, record)
    except Exception as err:  # noqa: BLE001 - a failing method is a result, recorded with its error
        status = next((v for k, v in (statuses or {}).items() if isinstance(err, k)), None)
        record.update(status=status or "failed", error=str(err) if status else f"{type(err).__name__}: {err}",
                      traceback="".join(traceback.format_exc(limit=-6)))
    record["run_wall_s"] = time.perf_counter() - start
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return record
