"""``peftlab offsite emulate`` and ``peftlab offsite plug``: Offsite-Tuning from the command line
(dispatched by :mod:`peftlab.cli`; ``peftlab bench offsite`` compares the results).

    peftlab offsite emulate --model minilm --keep-bottom 1 --keep-top 1 --drop-ratio 0.5 --out emu
    peftlab train --model emu --task sst2 --method "freeze_layers[blocks=layer.0|layer.3]" --out trained
    peftlab offsite plug --model minilm --adapter trained --out plugged
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peftlab
from peftlab.train.cli import CliError, user_errors
from peftlab.train.offsite.distill import distill_texts
from peftlab.train.offsite.emulate import build_emulator, read_manifest, save_emulator
from peftlab.train.offsite.plan import EmulatorPlan, PlanError, plan_emulator
from peftlab.train.offsite.plug import PlugError, plug_into
from peftlab.train.offsite.stack import block_stack
from peftlab.train.report import REPORT_FILE, format_table, versions
from peftlab.train.subcommands import subcommand_parser

PLUG_MANIFEST = "offsite_plug.json"
EMULATE_HELP = "cut a lossy emulator (bottom/top blocks kept as the adapter, middle blocks dropped uniformly)"
PLUG_HELP = "put the adapter blocks trained on an emulator back into the full model"


def build_parser() -> argparse.ArgumentParser:
    """The ``peftlab offsite`` parser: subcommands ``emulate`` and ``plug``."""
    parser, commands = subcommand_parser(
        "peftlab offsite", "Offsite-Tuning (Xiao et al. 2023): the data owner trains the adapter blocks on a lossy "
        "emulator, never seeing the full model.", {"emulate": EMULATE_HELP, "plug": PLUG_HELP})
    emulate, plug = commands["emulate"], commands["plug"]
    emulate.add_argument("--model", required=True, help="zoo name (minilm, smollm2) or a Hugging Face model directory")
    emulate.add_argument("--task", default="base", help="how to load --model (base: the encoder, or a decoder's LM)")
    emulate.add_argument("--keep-bottom", type=int, required=True, help="bottom blocks kept as the adapter")
    emulate.add_argument("--keep-top", type=int, required=True, help="top blocks kept as the adapter (>= 1)")
    size = emulate.add_mutually_exclusive_group(required=True)
    size.add_argument("--drop-ratio", type=float, help="share of the middle blocks dropped, e.g. 0.5")
    size.add_argument("--emulator-layers", type=int, help="number of middle blocks kept")
    emulate.add_argument("--distill-steps", type=int, default=0, help="AdamW steps distilling the middle blocks (0: none)")
    emulate.add_argument("--distill-data", help="task name (e.g. glue_sst2) or a .txt / .json / .jsonl file of text")
    emulate.add_argument("--distill-text-cols", help="comma-separated fields of a .json/.jsonl file (default: all text)")
    emulate.add_argument("--distill-limit", type=int, default=2000, help="texts sampled for distillation")
    emulate.add_argument("--distill-batch-size", type=int, default=8, help="texts per distillation step")
    emulate.add_argument("--distill-max-length", type=int, default=128, help="tokens per text")
    emulate.add_argument("--distill-lr", type=float, default=1e-4, help="AdamW learning rate of the distillation")
    emulate.add_argument("--seed", type=int, default=0, help="seed of the text sample and order")
    emulate.add_argument("--out", required=True, help="emulator directory (a Hugging Face model directory)")
    emulate.add_argument("--no-progress", action="store_true", help="no progress bar")
    plug.add_argument("--model", required=True, help="the full model the emulator was cut from")
    plug.add_argument("--adapter", required=True, help="adapter directory trained on the emulator (peftlab train --out)")
    plug.add_argument("--emulator", help="the emulator directory (default: the --model of the adapter's training report)")
    plug.add_argument("--kind", choices=("classification", "regression", "causal-lm"),
                      help="task of the adapter (default: from its report.json)")
    plug.add_argument("--num-labels", type=int, help="classes of a classification adapter (default: from report.json)")
    plug.add_argument("--out", required=True, help="directory for the full model with the plugged blocks")
    return parser


def run_emulate(args: argparse.Namespace) -> dict[str, Any]:
    """``peftlab offsite emulate``: load, plan, cut, optionally distil, save; returns the manifest."""
    if args.distill_steps > 0 and not args.distill_data:
        raise CliError("--distill-steps needs --distill-data: a task name (e.g. glue_sst2) or a .txt/.json/.jsonl file")
    started = time.perf_counter()
    with user_errors(ValueError, KeyError, OSError, ImportError):
        model, tokenizer = peftlab.zoo.load(args.model, task=args.task)
    with user_errors(PlanError):
        plan = plan_emulator(len(block_stack(model)[1]), args.keep_bottom, args.keep_top,
                             drop_ratio=args.drop_ratio, emulator_layers=args.emulator_layers)
        texts = None
        if args.distill_steps > 0:
            cols = [c.strip() for c in args.distill_text_cols.split(",")] if args.distill_text_cols else None
            texts = distill_texts(args.distill_data, args.distill_limit, args.seed, cols)
        emulator, distilled = build_emulator(
            model, plan, tokenizer, texts, args.distill_steps, batch_size=args.distill_batch_size,
            max_length=args.distill_max_length, lr=args.distill_lr, seed=args.seed, progress=not args.no_progress)
    if distilled is not None:
        distilled["data"] = args.distill_data
    path = save_emulator(emulator, tokenizer, plan, args.out, args.model, distilled)
    manifest = json.loads(path.read_text())
    params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in emulator.parameters()))
    rows = [("source", f"{args.model}: {plan.num_layers} blocks, {params[0]:,} parameters"),
            ("emulator", f"{plan.emulator_layers} blocks {plan.kept} (full-model indices), {params[1]:,} parameters"),
            ("adapter blocks", f"bottom {plan.bottom} + top {plan.top} (emulator blocks {plan.adapter_blocks})"),
            ("middle kept", f"{list(plan.middle)} of {plan.keep_bottom}..{plan.num_layers - plan.keep_top - 1}"),
            ("train with", manifest["train_hint"])]
    if distilled is not None:
        rows.append(("distillation", f"{distilled['steps']} steps on {args.distill_data}: normalised MSE "
                                     f"{distilled['loss_first']:.4f} -> {distilled['loss_last']:.4f}"))
    rows.append(("time", f"{time.perf_counter() - started:.1f} s"))
    print(format_table(rows, title=f"peftlab offsite emulate -> {args.out}"))
    return manifest


def adapter_task(adapter: Path, kind: str | None, num_labels: int | None) -> tuple[str, int | None, dict[str, Any]]:
    """The task an adapter was trained for: the flags, else its training report; and that report ({} if none)."""
    report_path = adapter / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    kind = kind or report.get("kind")
    if kind is None:
        raise CliError(f"{adapter} has no {REPORT_FILE}; pass --kind (classification, regression or causal-lm) "
                       "and, for classification, --num-labels")
    if kind == "classification" and num_labels is None:
        num_labels = len(report.get("label_names") or []) or None
        if num_labels is None:
            raise CliError(f"cannot tell how many classes the adapter in {adapter} predicts; pass --num-labels")
    return kind, (num_labels if kind == "classification" else None), report


def run_plug(args: argparse.Namespace) -> dict[str, Any]:
    """``peftlab offsite plug``: the full model with the trained adapter blocks, saved to ``--out``."""
    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise CliError(f"--adapter {adapter}: no such directory")
    kind, num_labels, report = adapter_task(adapter, args.kind, args.num_labels)
    emulator_dir = args.emulator or report.get("model")
    if not emulator_dir:
        raise CliError(f"cannot tell which emulator the adapter in {adapter} was trained on; pass --emulator DIR")
    with user_errors(ValueError, KeyError, OSError, ImportError):
        plan = EmulatorPlan.from_dict(read_manifest(emulator_dir)["plan"])
        full, tokenizer = peftlab.zoo.load(args.model, task=kind, num_labels=num_labels)
        emulator, _ = peftlab.zoo.load(emulator_dir, task=kind, num_labels=num_labels)
    with user_errors(PlugError, ValueError):
        mapping = plug_into(full, emulator, adapter, plan)
    out = Path(args.out)
    full.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    manifest = {"format": "peftlab-offsite-plug/1", "model": args.model, "emulator": str(emulator_dir),
                "adapter": str(adapter), "kind": kind, "num_labels": num_labels, "plan": plan.to_dict(),
                "plugged": mapping, "plugged_params": int(sum(full.state_dict()[k].numel() for k in mapping.values())),
                "argv": list(sys.argv[1:]), "versions": versions()}
    (out / PLUG_MANIFEST).write_text(json.dumps(manifest, indent=2))
    stack = block_stack(full)[0]
    inside = {k: re.match(rf"{re.escape(stack)}\.(\d+)\.", k) for k in mapping.values()}
    blocks = sorted({int(m.group(1)) for m in inside.values() if m})
    print(format_table([("tensors plugged", f"{len(mapping)} ({manifest['plugged_params']:,} parameters)"),
                        ("full-model blocks", str(blocks)),
                        ("outside the blocks", ", ".join(k for k, m in inside.items() if not m) or "-"),
                        ("load with", f"peftlab.zoo.load({str(out)!r}, task={kind!r}"
                                      + (f", num_labels={num_labels})" if num_labels else ")"))],
                       title=f"peftlab offsite plug -> {out}"))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftlab offsite`` with ``argv`` (without the leading ``offsite``); user errors raise :class:`CliError`."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.action == "emulate":
        run_emulate(args)
    else:
        run_plug(args)
    return 0
