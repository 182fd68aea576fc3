"""``peftlab bench methods``: the standard benchmark's command line (see :mod:`peftlab.bench.standard`).

    peftlab bench methods --preset smoke|glue-small|full [--methods lora,ia3,...] [--models minilm]
                          [--tasks sst2,rte] [--seeds N] [--steps N] --out DIR
    peftlab bench methods --models minilm --data train.csv --eval-data dev.csv --text-cols a,b --label-col y --out DIR
    peftlab bench methods --preset glue-small --compare-peft [--compare-only] [--compare-repeats N] --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from peftlab.bench.compare_peft import DEFAULT_REPEATS
from peftlab.bench.standard import PRESETS, Options, latest, read_results, run
from peftlab.bench.standard_run import FULL
from peftlab.train.cli import CliError, DefaultsHelpFormatter, add_data_arguments, check_device, one_line

HELP = "every registered method x models x tasks x seeds under one budget (report.md, results.jsonl, plots)"


def _items(text: str) -> list[str]:
    from peftlab.core.config import _split_top  # commas inside a method's [...] do not split

    return [x.strip() for x in _split_top(text, ",") if x.strip()]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``methods`` subcommand to ``peftlab bench``'s subparsers."""
    p = sub.add_parser("methods", help=HELP, description=HELP, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="smoke",
                   help="smoke: tiny models, seconds; glue-small: MiniLM on 4 GLUE tasks, about an hour on 2 CPU "
                        "cores; full: MiniLM and SmolLM2 on 7 GLUE tasks, 3 seeds (a GPU's job)")
    p.add_argument("--out", help="results directory (default runs/bench_methods/PRESET)")
    p.add_argument("--methods", help="comma-separated method names or method strings (lora[r=16]); 'all' = "
                                     f"every registered method and {FULL} (full fine-tuning); default all")
    p.add_argument("--models", help="comma-separated: minilm, smollm2, tiny-bert, tiny-llama, tiny-gpt2 or a Hugging "
                                    "Face model directory (default: the preset's)")
    p.add_argument("--tasks", help="comma-separated registered tasks (sst2, mrpc, rte, stsb, qnli, mnli, qqp) or smoke "
                                   "(default: the preset's; with --data, only your task unless --tasks is given)")
    add_data_arguments(p, "as a task of its own (read as peftlab train reads it)")
    p.add_argument("--data-name", help="the task's name in the report (default: the file's stem)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 per cell (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="examples per step (default: the preset's)")
    p.add_argument("--max-length", type=int, help="tokens per example (default: the preset's)")
    p.add_argument("--train-limit", type=int, help="train examples per task (default: the preset's)")
    p.add_argument("--eval-limit", type=int, help="eval examples per task (default: the preset's)")
    p.add_argument("--workers", type=int, help="worker processes running in parallel, 0 = in this process "
                                               "(default: the preset's)")
    p.add_argument("--threads", type=int, help="torch threads per worker, 0 = torch's default (default: the preset's)")
    fresh = p.add_mutually_exclusive_group()
    fresh.add_argument("--process-per-run", dest="fresh_process", action="store_true", default=None,
                       help="every run in a fresh process (default for glue-small and full)")
    fresh.add_argument("--reuse-processes", dest="fresh_process", action="store_false",
                       help="persistent workers that run many runs each (default for smoke)")
    p.add_argument("--timeout", type=float, help="seconds before a run is killed and recorded as failed")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--retry-failed", action="store_true", help="run the runs recorded as failed again")
    p.add_argument("--compare-peft", action="store_true",
                   help="also time our training step and Hugging Face PEFT's, interleaved, and measure both "
                        "peaks, for every method PEFT also has (one job per model, on the first task's batch)")
    p.add_argument("--compare-only", action="store_true",
                   help="run only the --compare-peft jobs (no training runs)")
    p.add_argument("--compare-repeats", type=int, default=DEFAULT_REPEATS,
                   help="timed steps per library in a --compare-peft job, ours and PEFT's alternating")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and the plots from results.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_methods(items: list[str]) -> tuple[str, ...] | None:
    from peftlab.bench.standard import all_methods
    from peftlab.core.config import parse_method_string

    if not items or items == ["all"]:
        return None
    out = []
    for item in items:
        if item == "all":
            out += [m for m in all_methods() if m not in out]
            continue
        if item != FULL:
            try:
                parse_method_string(item)
            except (ValueError, KeyError) as err:
                raise CliError(f"--methods {item}: {one_line(err)}") from err
        out.append(item)
    return tuple(dict.fromkeys(out))


def _check_models(items: list[str]) -> tuple[str, ...]:
    from peftlab.bench.smoke import TINY_PREFIX, is_tiny
    from peftlab.zoo import ZOO_NAMES

    for item in items:
        if not (item in ZOO_NAMES or is_tiny(item) or Path(item).is_dir()):
            raise CliError(f"--models {item}: not one of {', '.join(ZOO_NAMES)}, {TINY_PREFIX}bert, "
                           f"{TINY_PREFIX}llama, {TINY_PREFIX}gpt2 or a model directory")
    return tuple(items)


def _check_tasks(items: list[str]) -> tuple[str, ...]:
    from peftlab.bench.smoke import SMOKE_TASK
    from peftlab.train.tasks import get_task

    out = []
    for item in items:
        if item != SMOKE_TASK:
            try:
                item = get_task(item).name
            except ValueError as err:
                raise CliError(f"--tasks {item}: {one_line(err)}") from err
        out.append(item)
    return tuple(dict.fromkeys(out))


def _user_task(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.data:
        if args.eval_data or args.text_cols or args.label_col:
            raise CliError("--eval-data, --text-cols and --label-col go with --data FILE")
        return None
    if not args.text_cols or not args.label_col:
        raise CliError("--data needs --text-cols and --label-col")
    for path in (args.data, args.eval_data):
        if path and not Path(path).is_file():
            raise CliError(f"data file not found: {path}")
    return {"name": args.data_name or Path(args.data).stem, "data": str(Path(args.data).resolve()),
            "eval_data": str(Path(args.eval_data).resolve()) if args.eval_data else None,
            "text_cols": args.text_cols, "label_col": args.label_col, "label_kind": args.label_kind}


def options(args: argparse.Namespace, argv: list[str]) -> Options:
    """Validated :class:`Options` from the parsed arguments (bad input raises :class:`CliError`)."""
    for name in ("seeds", "steps", "batch_size", "max_length", "train_limit", "eval_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("workers", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise CliError(f"--{name} must be >= 0")
    if args.compare_repeats < 1:
        raise CliError(f"--compare-repeats must be at least 1, got {args.compare_repeats}")
    device = check_device(args.device, kinds=("cpu", "cuda"))
    user_task = _user_task(args)
    return Options(
        preset=args.preset, out=args.out or f"runs/bench_methods/{args.preset}",
        methods=_check_methods(_items(args.methods)) if args.methods else None,
        models=_check_models(_items(args.models)) if args.models else None,
        tasks=_check_tasks(_items(args.tasks)) if args.tasks else None, user_task=user_task,
        seeds=args.seeds, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
        train_limit=args.train_limit, eval_limit=args.eval_limit, workers=args.workers, threads=args.threads,
        fresh_process=args.fresh_process, timeout=args.timeout, device=device, retry_failed=args.retry_failed,
        compare_peft=args.compare_peft, compare_only=args.compare_only, compare_repeats=args.compare_repeats,
        argv=argv,
    )


def main(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``peftlab bench methods``; returns 0 when no recorded run failed, 1 otherwise, 2 on bad input."""
    from peftlab.bench.standard import META, BudgetMismatch
    from peftlab.bench.standard_report import write_report

    try:
        opts = options(args, argv)
        out = Path(opts.out)
        if args.report_only:
            meta_path = out / META
            if not meta_path.is_file():
                raise CliError(f"{out} has no {META}: nothing to report")
            records = list(latest(read_results(out)).values())
            paths = write_report(out, records, json.loads(meta_path.read_text()))
            print(f"report: {paths['report']}")
            return 1 if any(r.get("status") == "failed" for r in records) else 0
        summary = run(opts, progress=not args.quiet)
    except (CliError, BudgetMismatch) as err:
        print(f"peftlab bench: error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"bench methods: {summary['planned']} runs planned, {summary['skipped']} already in {opts.out}, "
          f"{summary['ran']} run now, {len(summary['failed'])} failed")
    print(f"report: {summary['report']}" + (f"   plots: {', '.join(summary['plots'])}" if summary["plots"] else ""))
    return 1 if any(r.get("status") == "failed" for r in latest(read_results(Path(opts.out))).values()) else 0
