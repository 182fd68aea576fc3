"""``peftlab bench serve``: the serving load benchmark, after S-LoRA's evaluation.

    peftlab bench serve [--model smollm2] [--adapters 1,8,32,128,1000] [--systems base,engine,peft_switch,peft_mixed]
                        [--requests 96] [--rate 4] [--cv 1] [--alpha 1] [--lengths alpaca] [--out runs/bench_serve.json]
    peftlab bench serve --soak 300 --adapters 32 --rate 2      # minutes at the rated load: memory flat, no failure

Every system replays the same trace (power-law adapter popularity, Gamma arrivals, Alpaca lengths)
in real time: the base model alone and the engine for each adapter count, Hugging Face PEFT
switching per request and PEFT's mixed batch at ``--peft-adapters`` (default 32, the issue's
comparison point). Each cell runs in a fresh process. Output: the JSON report, a printed table with
the issue's targets marked, and a plot next to the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from peftlab.bench.measure import WorkerError, run_isolated
from peftlab.serve.bench import report as rep
from peftlab.serve.bench.cells import SYSTEMS, TINY, run_cell
from peftlab.serve.bench.workload import WorkloadSpec, make_trace, parse_uniform
from peftlab.train.cli import CliError, DefaultsHelpFormatter, check_device
from peftlab.train.data import find_data_dir


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.replace("|", ",").split(",") if x.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected adapter counts >= 1, comma-separated (e.g. 1,8,32,1000)")
    return counts


def _systems(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in SYSTEMS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown system {bad[0] if bad else text!r}; choose from {', '.join(SYSTEMS)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    """The ``peftlab bench serve`` argument parser."""
    d = WorkloadSpec()
    p = argparse.ArgumentParser(prog="peftlab bench serve", formatter_class=DefaultsHelpFormatter,
                                description="Serving load benchmark: throughput, latency percentiles, deadline misses and "
                                            "peak memory of the engine against the base model and Hugging Face PEFT.")
    p.add_argument("--model", default="smollm2", help="zoo name or causal-LM directory")
    p.add_argument("--adapters", type=_counts, default=[1, 8, 32, 128, 1000], help="adapter counts for the engine (comma-separated)")
    p.add_argument("--systems", type=_systems, default=list(SYSTEMS), help=f"which of {', '.join(SYSTEMS)}")
    p.add_argument("--peft-adapters", type=int, default=32, help="adapter count of the PEFT rows and of the targets")
    p.add_argument("--requests", type=int, default=d.requests, help="requests per cell")
    p.add_argument("--rate", type=float, default=d.rate, help="arrival rate, requests per second")
    p.add_argument("--cv", type=float, default=d.cv, help="coefficient of variation of the Gamma arrival gaps (1: Poisson)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="power-law exponent of adapter popularity (0: uniform)")
    p.add_argument("--lengths", default=d.lengths, help="alpaca, or uniform:P0-P1,O0-O1 (prompt, output token ranges)")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="prompts cut to this many tokens")
    p.add_argument("--max-output-tokens", type=int, default=d.max_output_tokens, help="output lengths clipped to this")
    p.add_argument("--slo", type=float, default=d.slo_s, help="deadline of a request: arrival + this many seconds")
    p.add_argument("--max-batch", type=int, default=32, help="the engine's (and PEFT mixed batch's) batch limit")
    p.add_argument("--max-queue", type=int, default=256, help="queue limit of every system; more requests fail")
    p.add_argument("--threads", type=int, default=2, help="torch threads per cell")
    p.add_argument("--no-fused-steps", action="store_true",
                   help="the engine's cells without fused steps (one prefill call per group, then a decode call)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the trace and the adapters")
    p.add_argument("--soak", type=float, metavar="SECONDS",
                   help="soak mode: only the engine with the largest --adapters count, arrivals for SECONDS at --rate")
    p.add_argument("--out", help="JSON report (plot next to it); default runs/bench_serve.json (runs/bench_serve_soak.json)")
    p.add_argument("--adapter-dir", type=Path, help="keep (and reuse) the saved adapters here instead of a temporary folder")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one cell may take")
    p.add_argument("--isolate", choices=("auto", "always", "never"), default="auto",
                   help="a fresh process per cell (auto: yes, except for the tiny test model)")
    p.add_argument("--warmup", type=int, default=4, help="requests run before a cell's timed trace")
    p.add_argument("--from-json", help="re-print and re-plot a report, run nothing")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _spec(args: argparse.Namespace) -> WorkloadSpec:
    if args.lengths != "alpaca":
        try:
            parse_uniform(args.lengths)
        except ValueError as err:
            raise CliError(f"--lengths: {err}") from None
    for flag, value in (("--requests", args.requests), ("--rate", args.rate), ("--cv", args.cv), ("--max-batch", args.max_batch),
                        ("--max-queue", args.max_queue), ("--max-prompt-tokens", args.max_prompt_tokens),
                        ("--max-output-tokens", args.max_output_tokens), ("--threads", args.threads), ("--slo", args.slo)):
        if value <= 0:
            raise CliError(f"{flag} {value}: must be positive")
    if args.soak is not None and args.soak <= 0:
        raise CliError(f"--soak {args.soak}: must be a positive number of seconds")
    return WorkloadSpec(requests=args.requests, rate=args.rate, cv=args.cv, alpha=args.alpha, lengths=args.lengths,
                        max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                        min_output_tokens=min(4, args.max_output_tokens), slo_s=args.slo, seed=args.seed, duration_s=args.soak)


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The cells, as (system, adapter count): base once, the engine per count, PEFT at ``--peft-adapters``."""
    if args.soak is not None:
        return [("engine", args.adapters[-1])]
    cells: list[tuple[str, int]] = []
    for system in args.systems:
        if system == "base":
            cells.append(("base", 0))
        elif system == "engine":
            cells += [("engine", n) for n in args.adapters]
        else:
            cells.append((system, args.peft_adapters))
    return cells


def _meta(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "peftlab bench serve " + " ".join(argv),
            "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "load_before": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def _run(job: dict[str, Any], isolated: bool, timeout: float) -> dict[str, Any]:
    try:
        return run_isolated(job, timeout=timeout, worker="peftlab.serve.bench.worker") if isolated else run_cell(job)
    except (WorkerError, Exception) as err:  # noqa: BLE001 - a failed cell is recorded, the others still run
        message = " ".join(str(err).split())[-400:]
        return {"system": job["system"], "n_adapters": job["n_adapters"], "label": job["system"], "error": message}


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Run every cell of the plan and return the report (written to ``--out``)."""
    from peftlab.serve.bench.adapters import make_adapters
    from peftlab.serve.bench.cells import load_tokenizer

    spec = _spec(args)
    device = check_device(args.device, kinds=("cpu", "cuda"))
    cells = plan(args)
    isolated = args.isolate == "always" or (args.isolate == "auto" and args.model != TINY)
    tokenizer = load_tokenizer(args.model)  # the trace's prompts
    vocab = tokenizer_vocab(args.model, tokenizer)
    report: dict[str, Any] = {"settings": {**spec.to_dict(), "model": args.model, "max_batch": args.max_batch,
                                           "max_queue": args.max_queue, "threads": args.threads, "device": device,
                                           "compare_at": args.peft_adapters, "soak_s": args.soak,
                                           "fused_steps": not args.no_fused_steps},
                              "meta": _meta(args, argv), "cells": []}
    n_max = max(n for _, n in cells)
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-serve-") as tmp:
        root = args.adapter_dir or Path(tmp)
        dirs = make_adapters(args.model, n_max, root, seed=args.seed, progress=not args.quiet) if n_max else []
        try:
            for system, n in tqdm(cells, desc="bench serve", unit="cell", disable=args.quiet):
                trace = make_trace(spec, n, tokenizer, vocab, find_data_dir())
                job = {"kind": "serve", "row": f"{system}@{n}", "system": system, "n_adapters": n, "model": args.model,
                       "adapter_dirs": dirs[:n], "adapter_root": str(root.resolve()), "device": device, "threads": args.threads,
                       "max_batch": args.max_batch, "max_queue": args.max_queue, "slo_s": spec.slo_s, "warmup": args.warmup,
                       "timeout_s": args.timeout, "soak": args.soak is not None, "trace": [vars(r) for r in trace],
                       "engine_options": {"fused_steps": not args.no_fused_steps}}
                report["cells"].append(_run(job, isolated, args.timeout + 600))
        except FileNotFoundError as err:
            raise CliError(str(err)) from None
    report["meta"]["load_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if args.soak is not None:
        report["soak"] = report["cells"][0]
        report["soak_verdict"] = rep.soak_verdict(report["soak"]) if "error" not in report["soak"] else {"passed": False}
    report["targets"] = rep.targets(report)
    return report


def tokenizer_vocab(model: str, tokenizer: Any) -> int:
    """The ids random prompts may use: the model's vocabulary (the tiny model's is 128)."""
    if model == TINY:
        from peftlab.zoo.tiny import VOCAB

        return VOCAB
    return len(tokenizer)


def write(report: dict[str, Any], out: Path, plot: bool) -> str | None:
    """Write the JSON report and, unless ``plot`` is False, the plot next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return rep.plot(report, out.with_suffix(".png")) if plot else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftlab bench serve`` with ``argv`` (after ``bench serve``); returns the exit status:
    1 when a cell failed to run, 0 otherwise (targets are reported, not enforced)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["targets"] = rep.targets(report)
        print(rep.render(report))
        if not args.no_plot:
            print(f"\nplot: {rep.plot(report, Path(args.from_json).with_suffix('.png'))}")
        return 0
    out = Path(args.out or ("runs/bench_serve_soak.json" if args.soak is not None else "runs/bench_serve.json"))
    report = run(args, argv)
    plot_file = write(report, out, plot=not args.no_plot)
    print(rep.render(report))
    print(f"\nreport: {out}" + (f"   plot: {plot_file}" if plot_file else ""))
    return 1 if any("error" in c for c in report["cells"]) else 0
