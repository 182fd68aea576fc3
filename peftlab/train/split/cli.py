"""``peftlab split serve`` and ``peftlab split train``: split training from the command line
(dispatched by :mod:`peftlab.cli`; ``peftlab bench split`` measures it).

    peftlab split serve --model minilm --port 8790                 # the frozen model (one process)
    peftlab split train --server 127.0.0.1:8790 --model minilm --task sst2 \\
        --method "lora[r=8,targets=query|value]" --max-steps 50 --out runs/split_sst2   # data + adapter
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peftlab
from peftlab.train.cli import check_device, method_default_lr, user_errors
from peftlab.train.data import head_module_names, load_task, make_loader
from peftlab.train.evaluation import evaluate_model
from peftlab.train.report import format_bytes, format_table, versions, write_report
from peftlab.train.split.backbone import SplitError
from peftlab.train.split.client import SplitModel, check_method
from peftlab.train.split.connection import SplitConnection, Traffic
from peftlab.train.split.server import serve
from peftlab.train.subcommands import subcommand_parser
from peftlab.train.trainer import Trainer
from peftlab.zoo.seeding import seeded

SERVE_HELP = "run the frozen model for split-training clients (HTTP)"
TRAIN_HELP = "train an adapter here while the frozen model runs on a split server"


def build_parser() -> argparse.ArgumentParser:
    """The ``peftlab split`` parser: subcommands ``serve`` and ``train``."""
    parser, commands = subcommand_parser(
        "peftlab split", "Split training (DLoRA): the frozen model in one process, the data and the trainable PEFT "
        "modules in another, over HTTP.", {"serve": SERVE_HELP, "train": TRAIN_HELP})
    srv, train = commands["serve"], commands["train"]
    srv.add_argument("--model", required=True, help="zoo name (minilm, smollm2) or a Hugging Face model directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8790, help="port to listen on (0: any free port, printed)")
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N: where the frozen model runs")
    srv.add_argument("--preload", choices=("classification", "regression"),
                     help="load the model for this task before listening (else at the first client)")
    srv.add_argument("--num-labels", type=int, help="classes for --preload classification (default 2)")
    train.add_argument("--server", required=True, help="HOST:PORT of peftlab split serve")
    train.add_argument("--model", default="minilm", help="the server's model (the client places the adapter on its copy)")
    train.add_argument("--task", required=True, help="registered classification or regression task, e.g. glue_sst2")
    train.add_argument("--method", default="lora[r=8]", help='method string, e.g. "lora[r=8,targets=query|value]"')
    train.add_argument("--out", required=True, help="directory for the adapter and report.json")
    train.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--lr", type=float, help="peak learning rate (default: the method's default_lr)")
    train.add_argument("--warmup-ratio", type=float, default=0.06, help="share of the steps spent warming up the lr")
    train.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    train.add_argument("--max-length", type=int, default=128, help="tokens per example")
    train.add_argument("--train-limit", type=int, help="random subset of this many train examples")
    train.add_argument("--eval-limit", type=int, help="random subset of this many eval examples")
    train.add_argument("--seed", type=int, default=0, help="seed of the data order, subsets and the adapter's init")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_serve(args: argparse.Namespace) -> None:
    """``peftlab split serve``: serve until interrupted."""
    device = check_device(args.device, ("cpu", "cuda"))
    with user_errors(ValueError, KeyError, OSError, ImportError):
        serve(args.model, args.host, args.port, device, args.preload, args.num_labels)


def traffic_per_step(traffic: Traffic, steps: int) -> dict[str, float]:
    """Requests and bytes per training step (forward and backward of every micro-batch of the step)."""
    return {"requests": traffic.requests / steps, "bytes_sent": traffic.bytes_sent / steps,
            "bytes_received": traffic.bytes_received / steps, "bytes_total": traffic.bytes_total / steps}


def run_split_train(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``peftlab split train``: place the adapter, open a session, evaluate, train, evaluate, save, report."""
    started = time.perf_counter()
    out = Path(args.out)
    with user_errors(SplitError, ValueError, KeyError):  # before anything is loaded
        check_method(args.method)
        connection = SplitConnection(args.server)
        server = connection.health()
    train_ex = load_task(args.task, "train", limit=args.train_limit, seed=args.seed)
    eval_ex = load_task(args.task, "eval", limit=args.eval_limit, seed=args.seed)
    lr = args.lr if args.lr is not None else method_default_lr(args.method)
    num_labels = train_ex.num_labels if train_ex.kind == "classification" else None
    with user_errors(ValueError, KeyError, OSError, ImportError):
        model, tokenizer = peftlab.zoo.load(args.model, task=train_ex.kind, num_labels=num_labels)
        heads = head_module_names(model)
        overrides = {"modules_to_save": heads} if heads and "modules_to_save" not in args.method else {}
        with seeded(args.seed):  # the adapter's init, as peftlab train seeds it
            pm = peftlab.apply(model, args.method, **overrides)
    with user_errors(SplitError):
        net = SplitModel(pm, connection, task=train_ex.kind, num_labels=num_labels)
    train_loader = make_loader(train_ex, tokenizer, args.batch_size, args.max_length, shuffle=True, seed=args.seed)
    eval_loader = make_loader(eval_ex, tokenizer, args.batch_size, args.max_length)
    try:
        with user_errors(SplitError):
            before = evaluate_model(net, eval_loader)
            trainer = Trainer(net, train_loader, eval_loader, optimizer_groups=peftlab.param_groups(pm, lr=lr), lr=lr,
                              epochs=args.epochs, max_steps=args.max_steps, warmup_ratio=args.warmup_ratio,
                              progress=not args.no_progress, seed=args.seed)
            result = trainer.train()
    finally:
        net.close()
    pm.save(out)
    metric = train_ex.metrics[0]
    per_step = traffic_per_step(net.train_traffic, result["steps"])
    report = {
        "mode": "split", "server": args.server, "server_model": server.get("model"), "model": args.model,
        "task": train_ex.task, "method": args.method,
        "session": net.session, "adapted_modules": len(net.plans),
        "metric_names": list(train_ex.metrics), "metric": metric, "metric_before": before.get(metric),
        "metric_after": (result["eval"] or {}).get(metric), "metrics_before": before, "metrics_after": result["eval"],
        "lr": lr, "batch_size": args.batch_size, "max_length": args.max_length,
        "traffic_per_step": per_step, "train_traffic": vars(net.train_traffic), "eval_traffic": vars(net.eval_traffic),
        "traffic": vars(net.connection.traffic),  # everything, /open and /close included
        **{k: v for k, v in result.items() if k != "eval"},
        "total_time_s": time.perf_counter() - started,
        "argv": list(sys.argv[1:] if argv is None else argv), "seed": args.seed, "versions": versions(),
    }
    write_report(out, report)
    print(format_table([
        ("server", f"{args.server} ({net.session.get('class')} on {net.session.get('device')})"),
        ("adapter", f"{args.method}: {len(net.plans)} modules on the client"),
        (metric, f"{before.get(metric):.4f} -> {(result['eval'] or {}).get(metric, float('nan')):.4f}"),
        ("train loss", f"{result['loss_curve'][0]:.4f} -> {result['loss_curve'][-1]:.4f}"),
        ("steps", str(result["steps"])),
        ("per step", f"{per_step['requests']:.0f} requests, {format_bytes(per_step['bytes_sent'])} sent, "
                     f"{format_bytes(per_step['bytes_received'])} received"),
        ("time per step", f"{result['train_time_s'] / max(1, result['steps']):.2f} s"),
    ], title=f"peftlab split train -> {out}"))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftlab split`` with ``argv`` (without the leading ``split``); user errors raise :class:`CliError`."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    if args.action == "serve":
        run_serve(args)
    else:
        run_split_train(args, args_list)
    return 0
