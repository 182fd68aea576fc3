"""``peftlab bench split``: split training (DLoRA) against local training, per method.

For each ``--method``: the same adapter (same seed), data and budget trained twice: locally (the
model and the adapter in this process) and split (the frozen model in a ``peftlab split serve``
process on this machine, the data and the adapter here, over HTTP on localhost). Recorded per
step: requests, bytes each way (bodies; HTTP headers, about 150 bytes a request, are not counted),
time per step both ways, and the loss curves. Writes ``results.json``, prints a table, plots the
loss curves (``split.png``).

    peftlab bench split --model minilm --task sst2 --method "lora[r=8,targets=query|value]" --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peftlab
from peftlab.bench.report_main import pyplot, report_main, save_figure
from peftlab.bench.table import aligned
from peftlab.train.cli import DefaultsHelpFormatter
from peftlab.train.data import head_module_names, load_task, make_loader
from peftlab.train.report import format_bytes, versions
from peftlab.train.split.client import SplitModel, check_method
from peftlab.train.split.connection import SplitConnection
from peftlab.train.split.process import server_process
from peftlab.train.trainer import Trainer
from peftlab.zoo.seeding import seeded

DEFAULT_METHODS = ("lora[r=8,alpha=16,targets=query|value]", "ia3")


def build_parser() -> argparse.ArgumentParser:
    """The ``peftlab bench split`` parser."""
    parser = argparse.ArgumentParser(prog="peftlab bench split", formatter_class=DefaultsHelpFormatter,
                                     description="Split training (DLoRA) against local training: bytes, requests and "
                                                 "time per step.")
    parser.add_argument("--model", default="minilm", help="zoo name or model directory (a classification head is added)")
    parser.add_argument("--task", default="glue_sst2", help="registered classification or regression task")
    parser.add_argument("--method", action="append", help=f"method string; repeat for several (default: {DEFAULT_METHODS})")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process and of the server")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the adapter's init")
    parser.add_argument("--out", default="runs/bench_split", help="directory for results.json and the plot")
    return parser


def _train(net: Any, pm: Any, loader: Any, args: argparse.Namespace) -> dict[str, Any]:
    trainer = Trainer(net, loader, None, optimizer_groups=peftlab.param_groups(pm, lr=args.lr), lr=args.lr,
                      max_steps=args.steps, progress=False, seed=args.seed)
    return trainer.train()


def run_method(method: str, address: str, args: argparse.Namespace) -> dict[str, Any]:
    """The local and the split run of one method."""
    check_method(method)
    examples = load_task(args.task, "train", limit=args.steps * args.batch_size, seed=args.seed)
    num_labels = examples.num_labels if examples.kind == "classification" else None
    runs: dict[str, Any] = {}
    for mode in ("local", "split"):
        model, tokenizer = peftlab.zoo.load(args.model, task=examples.kind, num_labels=num_labels)
        with seeded(args.seed):
            pm = peftlab.apply(model, method, modules_to_save=head_module_names(model))
        loader = make_loader(examples, tokenizer, args.batch_size, args.max_length, shuffle=True, seed=args.seed)
        net = pm if mode == "local" else SplitModel(pm, SplitConnection(address), examples.kind, num_labels)
        result = _train(net, pm, loader, args)
        runs[mode] = {"time_per_step_s": result["train_time_s"] / result["steps"], "loss_curve": result["loss_curve"],
                      "tokens_per_step": result["tokens"] / result["steps"]}
        if mode == "split":
            steps = result["steps"]
            traffic = net.train_traffic
            runs[mode].update(requests_per_step=traffic.requests / steps, bytes_sent_per_step=traffic.bytes_sent / steps,
                              bytes_received_per_step=traffic.bytes_received / steps,
                              adapted_modules=len(net.plans))
            net.close()
        report = pm.report()
        runs["trainable_params"] = report["trainable_params"]
    runs["method"] = method
    runs["split_vs_local_time"] = runs["split"]["time_per_step_s"] / runs["local"]["time_per_step_s"]
    return runs


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every method, against one server process; returns the results (also written to ``OUT/results.json``)."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with server_process(args.model, threads=args.threads) as address:
        rows = [run_method(m, address, args) for m in (args.method or DEFAULT_METHODS)]
    result = {"model": args.model, "task": args.task, "rows": rows,
              "budget": {k: getattr(args, k) for k in ("steps", "batch_size", "max_length", "lr", "threads", "seed")},
              "wall_time_s": time.perf_counter() - started, "argv": list(sys.argv[1:]), "versions": versions()}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def render(result: dict[str, Any]) -> str:
    """The results as a table."""
    rows = []
    for r in result["rows"]:
        split, local = r["split"], r["local"]
        rows.append([r["method"], f"{r['trainable_params']:,}", str(split["adapted_modules"]),
                     f"{split['requests_per_step']:.0f}", format_bytes(split["bytes_received_per_step"]),
                     format_bytes(split["bytes_sent_per_step"]), f"{local['time_per_step_s']:.2f} s",
                     f"{split['time_per_step_s']:.2f} s", f"{r['split_vs_local_time']:.2f}x"])
    b = result["budget"]
    title = (f"split training, {result['model']} on {result['task']} ({b['steps']} steps x {b['batch_size']}, "
             f"<= {b['max_length']} tokens, {b['threads']} thread(s) per process, localhost)")
    return aligned(["method", "trainable", "modules", "requests/step", "server->client/step", "client->server/step",
                    "local s/step", "split s/step", "split/local"], rows, title)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Loss curves, local against split, one panel per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(result["rows"]), figsize=(5 * len(result["rows"]), 3.5), squeeze=False)
    for ax, r in zip(axes[0], result["rows"]):
        for mode, style in (("local", "-"), ("split", "--")):
            ax.plot(range(1, len(r[mode]["loss_curve"]) + 1), r[mode]["loss_curve"], style, label=mode)
        ax.set_title(r["method"], fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.legend()
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftlab bench split``; prints the table, writes results.json and the plot."""
    return report_main(argv, build_parser(), run, render, plot, "split.png")
