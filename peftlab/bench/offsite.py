"""``peftlab bench offsite``: Offsite-Tuning against its references on one task (seed 002 §6.3).

Every row runs the real commands (``peftlab offsite emulate``, ``peftlab train``, ``peftlab offsite
plug``) under one budget (steps, batch, length, lr, data, seed):

    full model, zero-shot             the full model with its fresh (seeded) task head, untrained
    emulator, zero-shot               the same on the emulator
    emulator, adapter fine-tuned      the adapter blocks (+ head) trained on the emulator, evaluated there
    plug-in (Offsite-Tuning)          those trained blocks plugged into the full model
    full model, adapter blocks tuned  the same blocks trained on the full model directly (the ceiling)
    full model, every block tuned     every block (+ head) trained: fine-tuning the full model

with and without distillation of the emulator when ``--distill-steps`` > 0. Writes ``results.json``,
prints a table and plots the metric per row (``offsite.png``).

    peftlab bench offsite --model minilm --task sst2 --keep-bottom 1 --keep-top 1 --drop-ratio 0.5 \\
        --distill-steps 200 --steps 60 --out runs/bench_offsite
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
from peftlab.train.cli import DefaultsHelpFormatter, add_train_arguments, run_train
from peftlab.train.eval_cli import add_eval_arguments, run_eval
from peftlab.train.offsite import cli as offsite_cli
from peftlab.train.offsite.plan import EmulatorPlan
from peftlab.train.offsite.stack import block_stack
from peftlab.train.report import versions


def build_parser() -> argparse.ArgumentParser:
    """The ``peftlab bench offsite`` parser."""
    parser = argparse.ArgumentParser(prog="peftlab bench offsite", formatter_class=DefaultsHelpFormatter,
                                     description="Offsite-Tuning: full model, emulator, plug-in and full fine-tuning "
                                                 "under one budget.")
    parser.add_argument("--model", default="minilm", help="zoo name or model directory (one block stack)")
    parser.add_argument("--task", default="glue_sst2", help="a task peftlab train knows (glue_sst2, alpaca, ...)")
    parser.add_argument("--keep-bottom", type=int, default=1, help="bottom adapter blocks")
    parser.add_argument("--keep-top", type=int, default=1, help="top adapter blocks")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--drop-ratio", type=float, help="share of the middle blocks dropped (default 0.5)")
    size.add_argument("--emulator-layers", type=int, help="middle blocks kept")
    parser.add_argument("--distill-steps", type=int, default=0, help="also rows with a distilled emulator (0: none)")
    parser.add_argument("--distill-data", help="distillation text: a task name or a .txt/.json/.jsonl file (default: --task)")
    parser.add_argument("--distill-lr", type=float, default=1e-4, help="distillation learning rate")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every training run")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every training run")
    parser.add_argument("--train-limit", type=int, default=2000, help="train examples (also the distillation texts)")
    parser.add_argument("--eval-limit", type=int, default=256, help="eval examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, subsets and inits")
    parser.add_argument("--out", default="runs/bench_offsite", help="directory for every run, results.json, the plot")
    return parser


def _train(model: str, method: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``peftlab train`` run; returns its report.json."""
    argv = ["--model", model, "--task", args.task, "--method", method, "--out", str(out), "--max-steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--lr", str(args.lr),
            "--train-limit", str(args.train_limit), "--eval-limit", str(args.eval_limit), "--seed", str(args.seed),
            "--no-progress"]
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    run_train(parser.parse_args(argv), argv)
    return json.loads((out / "report.json").read_text())


def _evaluate_dir(model_dir: Path, trained: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The metrics of the model in ``model_dir`` on the eval set of the run in ``trained``, scored by
    ``peftlab eval TRAINED --model MODEL_DIR --base`` (the run's adapter disabled: the model alone), so
    the plugged model is scored exactly as the training runs score theirs."""
    argv = [str(trained), "--model", str(model_dir), "--base", "--eval-limit", str(args.eval_limit), "--seed",
            str(args.seed), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--json", str(out), "--no-progress"]
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    run_eval(parser.parse_args(argv))
    return json.loads(out.read_text())["metrics"]


def _row(name: str, where: str, trained: str, metrics: dict[str, Any], report: dict[str, Any] | None = None,
         params: int | None = None) -> dict[str, Any]:
    report = report or {}
    return {"row": name, "model": where, "trained": trained, "metrics": metrics, "params": params,
            "train_time_s": report.get("train_time_s"), "trainable_params": report.get("trainable_params")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every row of the module docstring; returns the results (also written to ``OUT/results.json``)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    full, _ = peftlab.zoo.load(args.model)
    blocks = len(block_stack(full)[1])
    full_params = sum(p.numel() for p in full.parameters())
    size = ["--emulator-layers", str(args.emulator_layers)] if args.emulator_layers else \
        ["--drop-ratio", str(0.5 if args.drop_ratio is None else args.drop_ratio)]
    rows: list[dict[str, Any]] = []
    distilled = ["--distill-steps", str(args.distill_steps), "--distill-data", args.distill_data or args.task,
                 "--distill-limit", str(args.train_limit), "--distill-lr", str(args.distill_lr),
                 "--distill-max-length", str(args.max_length)]
    variants = [("", [])] + ([(" (distilled)", distilled)] if args.distill_steps > 0 else [])
    manifest: dict[str, Any] = {}
    for tag, extra in variants:
        slug = "distilled" if extra else "plain"
        emulator = out / f"emulator_{slug}"
        manifest = offsite_cli.run_emulate(offsite_cli.build_parser().parse_args(
            ["emulate", "--model", args.model, "--keep-bottom", str(args.keep_bottom), "--keep-top", str(args.keep_top),
             *size, *extra, "--seed", str(args.seed), "--out", str(emulator), "--no-progress"]))
        emu_params = sum(p.numel() for p in peftlab.zoo.load(str(emulator))[0].parameters())
        trained = _train(str(emulator), manifest["adapter_method"], out / f"trained_{slug}", args)
        rows.append(_row(f"emulator{tag}, zero-shot", f"emulator ({manifest['plan']['emulator_layers']} blocks)",
                         "-", trained["metrics_before"], params=emu_params))
        rows.append(_row(f"emulator{tag}, adapter fine-tuned", f"emulator ({manifest['plan']['emulator_layers']} blocks)",
                         manifest["adapter_method"], trained["metrics_after"], trained, emu_params))
        plugged_dir = out / f"plugged_{slug}"
        offsite_cli.run_plug(offsite_cli.build_parser().parse_args(
            ["plug", "--model", args.model, "--adapter", str(out / f"trained_{slug}"), "--out", str(plugged_dir)]))
        rows.append(_row(f"plug-in{tag} (Offsite-Tuning)", f"full ({blocks} blocks)", "adapter blocks from the emulator",
                         _evaluate_dir(plugged_dir, out / f"trained_{slug}", out / f"plugged_{slug}.json", args),
                         params=full_params))
    plan = EmulatorPlan.from_dict(manifest["plan"])
    leaf = block_stack(full)[0].split(".")[-1]
    same_blocks = "freeze_layers[blocks=" + "|".join(f"{leaf}.{i}" for i in plan.bottom + plan.top) + "]"
    direct = _train(args.model, same_blocks, out / "full_adapter_blocks", args)
    every = _train(args.model, f"freeze_layers[top={blocks}]", out / "full_every_block", args)
    rows[:0] = [_row("full model, zero-shot", f"full ({blocks} blocks)", "-", direct["metrics_before"],
                     params=full_params)]
    rows.append(_row("full model, adapter blocks fine-tuned", f"full ({blocks} blocks)", same_blocks,
                     direct["metrics_after"], direct, full_params))
    rows.append(_row("full model, every block fine-tuned", f"full ({blocks} blocks)", f"freeze_layers[top={blocks}]",
                     every["metrics_after"], every, full_params))
    result = {"model": args.model, "task": direct["task"], "metric": direct["metric"], "metrics": direct["metric_names"],
              "baseline": direct.get("baseline"), "plan": plan.to_dict(), "rows": rows,
              "budget": {k: getattr(args, k) for k in ("steps", "batch_size", "max_length", "lr", "train_limit",
                                                       "eval_limit", "seed", "distill_steps", "distill_lr")},
              "wall_time_s": time.perf_counter() - started, "argv": list(sys.argv[1:]), "versions": versions()}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def render(result: dict[str, Any]) -> str:
    """The results as a table."""
    metric = result["metric"]
    rows = [[r["row"], r["model"], f"{r['metrics'].get(metric, float('nan')):.4f}",
             f"{r['metrics'].get('loss', float('nan')):.4f}",
             f"{r['trainable_params']:,}" if r["trainable_params"] else "-",
             f"{r['train_time_s']:.0f} s" if r["train_time_s"] else "-"] for r in result["rows"]]
    budget = result["budget"]
    title = (f"Offsite-Tuning, {result['model']} on {result['task']} ({budget['steps']} steps x {budget['batch_size']}, "
             f"lr {budget['lr']}, {budget['eval_limit']} eval examples)")
    return aligned(["row", "model", metric, "eval loss", "trained params", "train time"], rows, title)


def plot(result: dict[str, Any], path: Path) -> Path:
    """A horizontal bar per row (the metric), the no-skill baseline as a dashed line."""
    plt = pyplot()
    metric = result["metric"]
    names = [r["row"] for r in result["rows"]][::-1]
    values = [r["metrics"].get(metric) or 0.0 for r in result["rows"]][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    colors = ["tab:green" if "plug-in" in n else "tab:blue" if "emulator" in n else "tab:gray" for n in names]
    ax.barh(names, values, color=colors)
    floor = ((result.get("baseline") or {}).get("metrics") or {}).get(metric)
    if floor is not None:
        ax.axvline(floor, color="black", linestyle="--", linewidth=1, label=f"{result['baseline']['kind']} baseline")
        ax.legend(loc="lower right")
    ax.set_xlabel(metric)
    ax.set_title(f"Offsite-Tuning: {result['model']} on {result['task']}")
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftlab bench offsite``; prints the table, writes results.json and the plot."""
    return report_main(argv, build_parser(), run, render, plot, "offsite.png")
