"""The run-mechanics options of ``peftlab train`` (run config, resume, lr schedule, gradient
checkpointing, bf16, early stopping, checkpoints) and what they give the :class:`Trainer`."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from peftlab.train.checkpoint import checkpoint_folders, choose_checkpoint, read_manifest
from peftlab.train.schedules import SCHEDULES

CHECKPOINTS_DIR = "checkpoints"


def add_run_arguments(train: argparse.ArgumentParser) -> None:
    """Add the run-mechanics options to ``train`` (the ``peftlab train`` parser)."""
    train.add_argument("--config", metavar="FILE",
                       help="run config (.yaml, .yml or .json) of option: value pairs, named as the options with _ "
                            "for - (max_steps: 100); options given on the command line win")
    train.add_argument("--resume", metavar="DIR",
                       help="continue the run in DIR (its --out) from its newest good checkpoint, with the options "
                            "saved in DIR/run_config.json")
    train.add_argument("--lr-scheduler", choices=SCHEDULES, default="linear",
                       help="lr after warmup: linear decay to 0, cosine decay, constant (no warmup), "
                            "constant_with_warmup")
    train.add_argument("--warmup-steps", type=int, help="warmup steps (default: ceil(--warmup-ratio x steps))")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, more time")
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast; --bf16 requires it (an error where the device lacks it), --no-bf16 turns "
                            "it off (default: on where the device supports it: CUDA, compute capability 8.0+)")
    train.add_argument("--early-stopping-patience", type=int, metavar="N",
                       help="stop after N evaluations (--eval-every) in a row without improving the eval metric")
    train.add_argument("--early-stopping-metric", metavar="NAME",
                       help="the metric early stopping watches (default: the task's first metric; loss counts as "
                            "lower-is-better)")
    train.add_argument("--save-every", type=int, metavar="N",
                       help="checkpoint every N steps into OUT/checkpoints, for --resume (default: --eval-every)")
    train.add_argument("--keep-checkpoints", type=int, default=3, metavar="K",
                       help="keep the K newest step checkpoints (the final one is always kept)")


def check_run_options(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` for run options that cannot work together (before anything is loaded)."""
    for name in ("save_every", "keep_checkpoints", "early_stopping_patience", "warmup_steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup_steps" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup_steps' else 1}, got {value}")
    if args.early_stopping_patience is not None and not args.eval_every:
        raise ValueError("--early-stopping-patience needs evaluations during training: give --eval-every N")


def check_early_stopping_metric(args: argparse.Namespace, evaluation: dict[str, Any]) -> None:
    """``--early-stopping-metric`` must be a number the evaluation gives (``evaluation``: the one
    made before training), else a ``ValueError`` listing them, before any step is taken."""
    name = args.early_stopping_metric
    if args.early_stopping_patience is None or name is None or isinstance(evaluation.get(name), (int, float)):
        return
    given = [k for k, v in evaluation.items() if isinstance(v, (int, float)) and k not in ("examples", "eval_time_s")]
    raise ValueError(f"--early-stopping-metric {name}: the evaluation gives no such number; it gives {', '.join(given)}")


def checkpoints_enabled(args: argparse.Namespace) -> bool:
    """Whether the run writes step checkpoints (``--save-every`` or ``--eval-every``)."""
    return bool(args.save_every or args.eval_every)


def trainer_run_options(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The :class:`~peftlab.train.trainer.Trainer` keyword arguments these options give (the log
    goes to ``out``, checkpoints to ``out/checkpoints``)."""
    return {
        "lr_scheduler": args.lr_scheduler, "warmup_steps": args.warmup_steps, "save_every": args.save_every,
        "keep_checkpoints": args.keep_checkpoints, "gradient_checkpointing": args.gradient_checkpointing,
        "bf16": args.bf16, "early_stopping_patience": args.early_stopping_patience,
        "early_stopping_metric": args.early_stopping_metric, "log_dir": out,
        "checkpoint_dir": out / CHECKPOINTS_DIR if checkpoints_enabled(args) else None,
    }


def checkpoint_to_resume(out: Path) -> Path:
    """The newest good checkpoint of the run in ``out``; newer ones that fail verification are
    refused with a message on stderr. ``ValueError`` when none is usable."""
    folder, refusals = choose_checkpoint(out / CHECKPOINTS_DIR)
    for refusal in refusals:
        print(f"peftlab: {refusal}", file=sys.stderr)
    if folder is None:
        why = "; ".join(refusals) if refusals else "there are none (a run writes them with --save-every N or --eval-every N)"
        raise ValueError(f"--resume {out}: no usable checkpoint in {out / CHECKPOINTS_DIR}: {why}")
    print(f"peftlab: resuming from {folder} (step {read_manifest(folder)['step']})", file=sys.stderr)
    return folder


def refuse_unfinished_run(out: Path) -> None:
    """Before a new run into ``out``: a ``ValueError`` when ``out`` holds checkpoints of a run that
    did not finish (no ``final``): they may be hours of work, to continue with ``--resume``."""
    folders = checkpoint_folders(out / CHECKPOINTS_DIR)
    if folders and folders[0].name != "final":
        raise ValueError(f"--out {out} holds checkpoints of an unfinished run ({folders[0].name}); continue it with "
                         f"--resume {out}, or choose another --out")


def clear_finished_checkpoints(out: Path) -> None:
    """Remove the checkpoints of an earlier, finished run in ``out`` before a new run writes its own
    (its adapter and report are overwritten too); see :func:`refuse_unfinished_run`."""
    refuse_unfinished_run(out)
    if (out / CHECKPOINTS_DIR).is_dir():
        shutil.rmtree(out / CHECKPOINTS_DIR)
