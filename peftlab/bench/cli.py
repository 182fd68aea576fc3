"""``peftlab bench ...``: the benchmark's command line. ``peftlab bench lora`` compares peftlab with
Hugging Face PEFT on LoRA/DoRA training steps, inference and mixed-adapter batches; ``peftlab bench
methods`` runs every registered method under one budget (:mod:`peftlab.bench.standard_cli`). ``peftlab
bench serve``, the serving load benchmark, is dispatched by :mod:`peftlab.cli` to
:mod:`peftlab.serve.bench.cli` (the serve layer sits above this one).

    peftlab bench lora [--models smollm2,minilm] [--steps N] [--out runs/bench_lora.json]
                       [--quick] [--only train|infer|mixed] [--rows lora_qv,dora_qv] [--interleave] [--threads N]
                       [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from peftlab.bench import processes, standard_cli
from peftlab.bench import multi as multi_bench
from peftlab.bench.lora import TRAIN_ROWS
from peftlab.bench.models import SPECS
from peftlab.bench.suite import SECTIONS, Options
from peftlab.train.cli import CliError, DefaultsHelpFormatter, check_device


def _csv(choices: Sequence[str], what: str):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.replace("|", ",").split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad[0] if bad else text!r}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``peftlab bench`` argument parser (subcommands ``lora`` and ``methods``)."""
    parser = argparse.ArgumentParser(prog="peftlab bench", description="Benchmarks: peftlab vs Hugging Face PEFT. (peftlab bench serve: "
                                     "the serving load benchmark, see peftlab bench serve --help.)",
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{lora,methods,processes,multi}")
    lora = sub.add_parser("lora", help="LoRA/DoRA: train step, inference, mixed-adapter batches",
                          description="LoRA/DoRA training steps, inference (merged and unmerged) and mixed-adapter "
                                      "batches, peftlab and PEFT side by side in one run.",
                          formatter_class=DefaultsHelpFormatter)
    # "tiny" (a tiny random Llama built in-process) is accepted but not advertised: it is for tests.
    lora.add_argument("--models", type=_csv(tuple(SPECS), "model"), default=("smollm2", "minilm"),
                      help="comma-separated: smollm2, minilm (default both)")
    lora.add_argument("--steps", type=int, default=3, help="timed steps per row after 1 warm-up (default 3)")
    lora.add_argument("--out", default="runs/bench_lora.json", help="JSON report (the plot goes next to it, .png)")
    lora.add_argument("--quick", action="store_true", help="tiny batch sizes (for tests and smoke runs)")
    lora.add_argument("--only", type=_csv(SECTIONS, "section"), default=SECTIONS,
                      help="train, infer or mixed (comma-separated for several; default all)")
    lora.add_argument("--rows", type=_csv(tuple(TRAIN_ROWS), "training row"), default=tuple(TRAIN_ROWS),
                      help=f"training rows to run, comma-separated: {', '.join(TRAIN_ROWS)} (default all)")
    lora.add_argument("--interleave", action="store_true",
                      help="run each adapter row's two libraries in one process, their training steps timed "
                           "alternately (steady on a busy machine; memory is then the peak of one step)")
    lora.add_argument("--threads", type=int, default=0, help="torch threads in every job (default: torch's default)")
    lora.add_argument("--device", default="auto",
                      help="auto (cuda when available, else cpu), cpu, cuda or cuda:N; a device this machine lacks "
                           "is an error")
    lora.add_argument("--seed", type=int, default=0, help="seed of the data and the adapters' init")
    lora.add_argument("--isolate", choices=("auto", "always", "never"), default="auto", help=argparse.SUPPRESS)
    lora.add_argument("--decode-factor", type=int, default=4, help=argparse.SUPPRESS)
    lora.add_argument("--from-json", help=argparse.SUPPRESS)  # re-print (and re-plot) a report, run nothing
    lora.add_argument("--no-plot", action="store_true", help="do not write the plot")
    lora.add_argument("--quiet", action="store_true", help="no progress bar")
    standard_cli.add_parser(sub)
    multi_bench.add_parser(sub)
    processes.add_parser(sub)
    return parser


def _warn_if_busy(threads: int) -> None:
    """Other processes distort timings; with several threads each also waits for its descheduled
    partners at every parallel region, so on a busy machine ``--threads 1`` is the robust choice."""
    load, cpus = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0), os.cpu_count() or 1
    if load > cpus - 0.5:
        hint = "" if threads == 1 else "; --threads 1 suffers least from it"
        print(f"peftlab bench: warning: load average {load:.1f} on {cpus} CPUs: other processes will distort "
              f"the timings{hint}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftlab bench`` with ``argv`` (without the leading ``bench``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.bench == "multi":
        _warn_if_busy(args.threads)
        return multi_bench.main(args)
    if args.bench == "methods":
        return standard_cli.main(args, argv[1:])
    if args.bench == "processes":
        return processes.main(args)
    if args.steps < 1:
        print("peftlab bench: error: --steps must be at least 1", file=sys.stderr)
        return 2
    try:
        check_device(args.device, kinds=("cpu", "cuda"))  # before anything is loaded
    except CliError as err:
        print(f"peftlab bench: error: {err}", file=sys.stderr)
        return 2
    from peftlab.bench.suite import run
    from peftlab.bench.table import load_report, plot, render

    if args.from_json:
        report = load_report(args.from_json)
        print(render(report))
        if not args.no_plot:
            print(f"\nplot: {plot(report, Path(args.from_json).with_suffix('.png'))}")
        return 0
    _warn_if_busy(args.threads)

    opts = Options(models=args.models, steps=args.steps, out=args.out, quick=args.quick, only=args.only, rows=args.rows, interleave=args.interleave,
                   threads=args.threads, device=args.device, seed=args.seed, isolate=args.isolate,
                   decode_factor=args.decode_factor, plot=not args.no_plot)
    report = run(opts, progress=not args.quiet)
    print(render(report))
    print(f"\nreport: {args.out}" + (f"   plot: {report['plot']}" if report.get("plot") else ""))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
