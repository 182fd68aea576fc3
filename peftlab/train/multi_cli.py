"""``peftlab train`` with several adapters in one run (:mod:`peftlab.train.multi`): the entries
of :func:`~peftlab.train.multi_options.requested_adapters` become adapter runs, trained jointly over
one base. The run writes one adapter directory per adapter, ``OUT/<name>/`` (its files and its own
``report.json``), and ``OUT/report.json`` (the joint run: shared wall time and peak memory, every
adapter's curve) with ``OUT/loss_curves.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftlab.core.config import parse_method_string
from peftlab.train.cli import _load_data, check_device, method_default_lr, user_errors
from peftlab.train.multi_options import adapter_name, max_rows_for, refuse_unsupported, rows_option
from peftlab.train.multi_setup import AdapterRun, check_shareable
from peftlab.train.report import versions, write_report


def _runs(args: argparse.Namespace, entries: list[dict[str, Any]]) -> list[AdapterRun]:
    """One :class:`~peftlab.train.multi_setup.AdapterRun` per entry: the entry's options over
    ``args``, its data read as ``peftlab train`` reads it, its lr (the method's default without one)."""
    runs: list[AdapterRun] = []
    taken: set[str] = set()
    for entry in entries:
        lane = argparse.Namespace(**{**vars(args), **entry})
        with user_errors(ValueError, KeyError):
            parse_method_string(lane.method)
        train_ex, eval_ex, data_name = _load_data(lane)
        with user_errors(ValueError):
            name = adapter_name(entry.get("name"), lane.method, data_name, taken)
        taken.add(name)
        given = lane.lr is not None
        trainer = {k: getattr(lane, k) for k in ("epochs", "max_steps", "warmup_ratio", "warmup_steps", "grad_accum",
                                                 "eval_every", "lr_scheduler", "bf16")}
        runs.append(AdapterRun(
            name=name, method=lane.method, train=train_ex, eval=eval_ex,
            lr=lane.lr if given else method_default_lr(lane.method), batch_size=lane.batch_size,
            max_length=lane.max_length, loraplus_ratio=lane.loraplus_ratio, weight_decay=lane.weight_decay,
            seed=lane.seed, trainer=trainer, task_name=data_name, lr_source="--lr" if given else "method default"))
    return runs


def run_multi(args: argparse.Namespace, entries: list[dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """``peftlab train`` with several adapters: train the adapters of ``entries`` (from
    :func:`requested_adapters`) jointly over one base, save each into ``OUT/<name>``, write the
    joint ``OUT/report.json`` and print its table. Bad input is a :class:`~peftlab.train.cli.CliError` before training."""
    from peftlab.train.multi_report import joint_table  # noqa: PLC0415
    from peftlab.train.multi_run import prepare_joint_run, train_jointly  # noqa: PLC0415

    started = time.perf_counter()
    with user_errors(ValueError, KeyError):  # before any data or model is loaded
        refuse_unsupported(args)
        rows_option(args.max_rows_per_forward)
        check_shareable({f"#{i + 1}": entry["method"] for i, entry in enumerate(entries)})
    out = Path(args.out)
    device = check_device(args.device)
    runs = _runs(args, entries)
    with user_errors(ValueError, KeyError, OSError, ImportError):  # model, heads, methods that do not apply
        joint = prepare_joint_run(args.model, runs, device, no_dropout=args.no_dropout,
                                  gradient_checkpointing=args.gradient_checkpointing)
    max_rows = max_rows_for(args.max_rows_per_forward, [run.batch_size for run in runs])
    report = train_jointly(joint, out, max_rows=max_rows, progress=not args.no_progress, seed=args.seed)
    report.update(total_time_s=time.perf_counter() - started, argv=list(sys.argv[1:] if argv is None else argv),
                  versions=versions())
    write_report(out, report)
    print(joint_table(report))
    return 0
