"""``peftlab bench multi``: several adapters trained in one joint run against one after another.

Every configuration is real ``peftlab train`` commands in fresh processes, with the same per-adapter
settings (method, batch, steps, length, data, seed):

* ``sequential``: one ``peftlab train --method M --task T`` per task, one after another;
* ``joint``: one ``peftlab train`` with every ``--task`` (one adapter each), as it runs by default:
  each joint micro-step in forward passes of at most one adapter's batch, the rows of all adapters
  ordered by length (rows of several adapters share a pass; a pass is one run's size);
* ``one-pass``: the same with ``--max-rows-per-forward all``: every adapter's micro-batch in one
  forward pass, padded to the longest row of all.

Per process: wall time of the whole command (start-up, data, model, evaluations, training, saving),
peak RSS of the process (the kernel's high-water mark, ``getrusage`` of the child), and from its
``report.json``: the training steps' time and the peak memory above the start of training.
Configurations run round after round (``--rounds``), their order rotated each round, so that a change
in the machine's load touches all of them alike; the summary takes medians over rounds.

Targets (issue 11): joint wall time ≤ 0.8 × the sequential runs' total; joint peak memory ≤ 1.2 × one
run's (the largest of the sequential runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peftlab.bench.measure import MB, median
from peftlab.train.cli import DefaultsHelpFormatter
from peftlab.train.report import versions

HELP = "several adapters in one joint peftlab train run against one run per adapter: wall time and peak memory"
TARGET_WALL, TARGET_MEMORY = 0.8, 1.2
VARIANTS = ("joint", "one-pass")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``multi`` subcommand to ``peftlab bench``'s subparsers."""
    p = sub.add_parser("multi", help=HELP, description=HELP, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="zoo name or Hugging Face model directory")
    p.add_argument("--tasks", default="sst2,mrpc,rte,stsb", help="comma-separated registered tasks, one adapter each")
    p.add_argument("--method", default="lora[r=8]", help="method string of every adapter")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per adapter")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step per adapter")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example")
    p.add_argument("--train-limit", type=int, default=1024, help="train examples per task")
    p.add_argument("--eval-limit", type=int, default=128, help="eval examples per task")
    p.add_argument("--rounds", type=int, default=2, help="times each configuration runs, interleaved")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    p.add_argument("--variants", default="joint,one-pass",
                   help="joint configurations beside sequential: joint (peftlab train's default: passes of one "
                        "batch), one-pass (--max-rows-per-forward all)")
    p.add_argument("--out", default="runs/bench_multi.json", help="JSON results (the plot goes next to it, .png)")
    p.add_argument("--from-json", help="print (and plot) an earlier result, run nothing")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    return p


def run_measured(command: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``command`` to its end with stdout and stderr in ``log``; its wall seconds, CPU seconds
    (user + system, all threads: less sensitive than wall time to other processes on the machine) and
    peak RSS in bytes (``ru_maxrss`` of that child, from ``os.wait4``). A failure raises
    ``RuntimeError`` with the log's tail."""
    with log.open("w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:4])} ... failed (exit {proc.returncode}):\n{tail}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * scale}


def _train_command(args: argparse.Namespace, tasks: list[str], out: Path, rows: str | None) -> list[str]:
    command = [sys.executable, "-m", "peftlab", "train", "--model", args.model]
    for task in tasks:
        command += ["--task", task]
    command += ["--method", args.method, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--max-length", str(args.max_length), "--train-limit", str(args.train_limit),
                "--eval-limit", str(args.eval_limit), "--device", "cpu", "--no-progress", "--out", str(out)]
    return command + (["--max-rows-per-forward", rows] if rows else [])


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def run_sequential(args: argparse.Namespace, tasks: list[str], work: Path) -> dict[str, Any]:
    """One ``peftlab train`` per task, one after another: per run and in total."""
    runs = []
    for task in tasks:
        out = work / f"seq-{task}"
        measured = run_measured(_train_command(args, [task], out, None), _env(args.threads), work / f"seq-{task}.log")
        report = json.loads((out / "report.json").read_text())
        runs.append({"task": task, **measured, "train_time_s": report["train_time_s"],
                     "peak_memory_bytes": report["peak_memory_bytes"], "metric": report["metric"],
                     "metric_after": report["metric_after"], "final_loss": report["final_loss"]})
    return {"runs": runs, "wall_s": sum(r["wall_s"] for r in runs), "cpu_s": sum(r["cpu_s"] for r in runs),
            "train_time_s": sum(r["train_time_s"] for r in runs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs)}


def run_joint(args: argparse.Namespace, tasks: list[str], work: Path, name: str) -> dict[str, Any]:
    """One ``peftlab train`` with every task: ``name`` ``joint`` as it runs by default, ``one-pass``
    with ``--max-rows-per-forward all``."""
    out = work / name
    rows = "all" if name == "one-pass" else None
    measured = run_measured(_train_command(args, tasks, out, rows), _env(args.threads), work / f"{name}.log")
    report = json.loads((out / "report.json").read_text())
    adapters = [{"task": a["task"], "metric": a["metric"], "metric_after": a["metric_after"],
                 "final_loss": a["loss_curve"][-1]} for a in report["adapters"].values()]
    return {**measured, "train_time_s": report["train_time_s"], "peak_memory_bytes": report["peak_memory_bytes"],
            "forward_passes": report["forward_passes"], "max_rows": report["max_rows"], "adapters": adapters}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per configuration, ratios to the sequential runs, and the targets."""
    summary: dict[str, Any] = {}
    for name in rounds[0]:
        if name == "order":
            continue
        summary[name] = {key: median([r[name][key] for r in rounds])
                         for key in ("wall_s", "cpu_s", "train_time_s", "peak_rss_bytes", "peak_memory_bytes")}
    sequential = summary["sequential"]
    for name, values in summary.items():
        values["wall_vs_sequential"] = values["wall_s"] / sequential["wall_s"]
        values["cpu_vs_sequential"] = values["cpu_s"] / sequential["cpu_s"]
        values["train_time_vs_sequential"] = values["train_time_s"] / sequential["train_time_s"]
        values["peak_rss_vs_one_run"] = values["peak_rss_bytes"] / sequential["peak_rss_bytes"]
        values["peak_memory_vs_one_run"] = values["peak_memory_bytes"] / max(1, sequential["peak_memory_bytes"])
    targets = []
    for name in (n for n in summary if n != "sequential"):
        values = summary[name]
        targets.append({"configuration": name, "what": f"wall time <= {TARGET_WALL}x the sequential runs",
                        "value": values["wall_vs_sequential"], "met": values["wall_vs_sequential"] <= TARGET_WALL})
        targets.append({"configuration": name, "what": f"peak RSS <= {TARGET_MEMORY}x one run's",
                        "value": values["peak_rss_vs_one_run"], "met": values["peak_rss_vs_one_run"] <= TARGET_MEMORY})
    return {"configurations": summary, "targets": targets}


LABELS = {"sequential": "sequential (one run per adapter)", "joint": "joint (default: passes of one batch)",
          "one-pass": "joint, one pass per micro-step"}


def render(result: dict[str, Any]) -> str:
    """The printed table: per configuration the medians and ratios, then each target's verdict."""
    settings = result["settings"]
    header = ("configuration", "wall s", "CPU s", "train steps s", "peak RSS MiB", "train peak MiB", "wall / seq",
              "CPU / seq", "RSS / one run")
    rows = []
    for name, v in result["summary"]["configurations"].items():
        rows.append((LABELS.get(name, name), f"{v['wall_s']:.1f}", f"{v['cpu_s']:.1f}", f"{v['train_time_s']:.1f}",
                     f"{v['peak_rss_bytes'] / MB:.0f}", f"{v['peak_memory_bytes'] / MB:.0f}",
                     f"{v['wall_vs_sequential']:.2f}", f"{v['cpu_vs_sequential']:.2f}",
                     f"{v['peak_rss_vs_one_run']:.2f}"))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = [f"peftlab bench multi: {len(settings['tasks'])} x {settings['method']} on {settings['model']} "
             f"({', '.join(settings['tasks'])}), {settings['steps']} steps x {settings['batch_size']} examples "
             f"x {settings['max_length']} tokens per adapter, {settings['threads']} threads, median of "
             f"{settings['rounds']} round(s)"]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    for target in result["summary"]["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"target {LABELS.get(target['configuration'], target['configuration'])}: {target['what']}: "
                     f"{target['value']:.2f} -> {verdict}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Wall time (training steps and the rest) and peak RSS per configuration; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    configs = result["summary"]["configurations"]
    names = [LABELS.get(n, n) for n in configs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    train = [v["train_time_s"] for v in configs.values()]
    rest = [v["wall_s"] - v["train_time_s"] for v in configs.values()]
    left.barh(names, train, label="training steps")
    left.barh(names, rest, left=train, label="start-up, data, model, evaluation, saving")
    sequential = configs["sequential"]["wall_s"]
    left.axvline(TARGET_WALL * sequential, color="tab:red", ls="--", lw=1, label=f"target: {TARGET_WALL}x sequential")
    left.set_xlabel("wall time (s)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    right.barh(names, [v["peak_rss_bytes"] / MB for v in configs.values()], color="tab:green")
    right.axvline(TARGET_MEMORY * configs["sequential"]["peak_rss_bytes"] / MB, color="tab:red", ls="--", lw=1,
                  label=f"target: {TARGET_MEMORY}x one run")
    right.set_xlabel("peak RSS of the process (MiB)")
    right.set_yticks([])
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.suptitle(f"{len(result['settings']['tasks'])} adapters: one joint run against one run per adapter")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration, ``args.rounds`` times, order rotated per round; the result dict."""
    import tempfile  # noqa: PLC0415

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if len(tasks) < 2 or bad or args.rounds < 1 or args.steps < 1:
        raise ValueError(f"need at least 2 tasks, variants among {', '.join(VARIANTS)}, rounds and steps >= 1 "
                         f"(got tasks {tasks}, variants {variants}, rounds {args.rounds}, steps {args.steps})")
    configs = ["sequential", *variants]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-multi-") as tmp:
        for index in range(args.rounds):
            order = configs[index % len(configs):] + configs[:index % len(configs)]
            measured: dict[str, Any] = {"order": order}
            for name in order:
                work = Path(tmp) / f"round{index}"
                work.mkdir(exist_ok=True)
                print(f"round {index + 1}/{args.rounds}: {LABELS[name]} ...", file=sys.stderr, flush=True)
                if name == "sequential":
                    measured[name] = run_sequential(args, tasks, work)
                else:
                    measured[name] = run_joint(args, tasks, work, name)
            rounds.append(measured)
    settings = {k: getattr(args, k) for k in ("model", "method", "steps", "batch_size", "max_length", "train_limit",
                                              "eval_limit", "rounds", "threads")}
    return {
        "settings": {**settings, "tasks": tasks, "variants": variants},
        "machine": {"cpus": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                    "started": started},
        "versions": versions(), "rounds": rounds, "summary": summarize(rounds),
    }


def main(args: argparse.Namespace) -> int:
    """``peftlab bench multi``: run (or, with ``--from-json``, re-read) and print; 0 on success."""
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        out = Path(args.from_json)
    else:
        try:
            result = run(args)
        except (ValueError, RuntimeError) as err:
            print(f"peftlab bench: error: {err}", file=sys.stderr)
            return 2 if isinstance(err, ValueError) else 1
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    png = None if args.no_plot else plot(result, out.with_suffix(".png"))
    print(f"\nresults: {out}" + (f"   plot: {png}" if png else ""))
    return 0
