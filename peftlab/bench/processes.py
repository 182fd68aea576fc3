"""``peftlab bench processes``: one process against several (torchrun, DDP) on the same examples.

Each configuration is a real ``peftlab train`` command in fresh processes: one process with 1 torch
thread, one process with ``--threads`` threads, and ``torchrun --nproc_per_node P`` with 1 thread
per process and the global batch kept (``--batch-size`` / P each). For each, the JSON records the
wall time of the whole command (start-up and evaluation included), the training steps' time and
throughput from its ``report.json``, and the final loss and metric. Configurations are run round
after round (``--rounds``), so that a change in the machine's load touches all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peftlab.bench.measure import median
from peftlab.train.cli import DefaultsHelpFormatter
from peftlab.train.report import format_table, versions

HELP = "wall time of peftlab train in 1 process against P processes (torchrun, DDP) on the same examples"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``processes`` subcommand to ``peftlab bench``'s subparsers."""
    p = sub.add_parser("processes", help=HELP, description=HELP, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="zoo name or Hugging Face model directory")
    p.add_argument("--task", default="sst2", help="registered task")
    p.add_argument("--method", default="lora[r=8]", help="method string")
    p.add_argument("--examples", type=int, default=512, help="training examples (one epoch)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (each of P processes takes 1/P)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example")
    p.add_argument("--eval-limit", type=int, default=64, help="evaluation examples")
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun configuration")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the multi-threaded one-process run")
    p.add_argument("--rounds", type=int, default=1, help="times each configuration runs, interleaved")
    p.add_argument("--out", default="runs/bench_processes.json", help="JSON results (the plot goes next to it, .png)")
    return p


def configurations(nproc: int, threads: int) -> list[dict[str, Any]]:
    """The runs compared: name, launcher prefix (None: plain python), processes, threads per process."""
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc)]
    return [
        {"name": "1 process, 1 thread", "launcher": None, "processes": 1, "threads": 1},
        {"name": f"1 process, {threads} threads", "launcher": None, "processes": 1, "threads": threads},
        {"name": f"{nproc} processes (torchrun, DDP), 1 thread each", "launcher": torchrun, "processes": nproc,
         "threads": 1},
    ]


def run_one(config: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run one configuration once; its measurements and report fields."""
    if args.batch_size % config["processes"]:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of {config['processes']} processes")
    command = [*(config["launcher"] or [sys.executable]), "-m", "peftlab", "train", "--model", args.model,
               "--task", args.task, "--method", args.method, "--train-limit", str(args.examples),
               "--eval-limit", str(args.eval_limit), "--max-length", str(args.max_length), "--epochs", "1",
               "--batch-size", str(args.batch_size // config["processes"]), "--device", "cpu", "--no-progress",
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"])}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{config['name']} failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "train_time_s": report["train_time_s"], "examples": report["examples"],
            "steps": report["steps"], "examples_per_s": report["examples"] / report["train_time_s"],
            "final_loss": report["final_loss"], "metric": report["metric"], "metric_after": report["metric_after"],
            "processes_report": report.get("processes")}


def plot(results: dict[str, Any], path: Path) -> Path:
    """Bars of training examples per second and whole-command wall time, one pair per configuration."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = results["configurations"]
    names = [r["name"].replace(", ", ",\n") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "examples_per_s", "training examples / s (median)"),
                           (axes[1], "wall_s", "whole command wall time, s (median)")):
        ax.bar(names, [r[key] for r in rows], color=["#888", "#5a8", "#36c"][: len(rows)])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"peftlab train, {results['settings']['examples']} examples of {results['settings']['model']}: "
                 f"{results['machine']['cpus']} CPUs, load {results['machine']['load_before']:.1f} at start",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    """Run every configuration ``--rounds`` times, write the JSON and the plot, print the table."""
    configs = configurations(args.nproc, args.threads)
    runs: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in configs}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for i, config in enumerate(configs):
                print(f"round {round_ + 1}/{args.rounds}: {config['name']}", file=sys.stderr, flush=True)
                runs[config["name"]].append(run_one(config, args, Path(tmp) / f"{round_}-{i}"))
    rows = []
    for config in configs:
        measured = runs[config["name"]]
        rows.append({"name": config["name"], "processes": config["processes"], "threads": config["threads"],
                     **{k: median([m[k] for m in measured]) for k in ("wall_s", "train_time_s", "examples_per_s")},
                     "runs": measured})
    results = {
        "settings": {k: getattr(args, k) for k in ("model", "task", "method", "examples", "batch_size", "max_length",
                                                   "eval_limit", "nproc", "threads", "rounds")},
        "machine": {"cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "versions": versions(), "configurations": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    base = rows[0]["examples_per_s"]
    table = [(r["name"], f"{r['examples_per_s']:.1f} ex/s ({r['examples_per_s'] / base:.2f}x), "
                         f"train {r['train_time_s']:.1f} s, command {r['wall_s']:.1f} s") for r in rows]
    print(format_table(table, title=f"peftlab bench processes -> {out}"))
    print(f"plot: {plot(results, out.with_suffix('.png'))}")
    return 0
