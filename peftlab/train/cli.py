"""The ``peftlab`` command: ``train`` an adapter, show its ``info``, or run the ``bench``.

Bad input (unknown task, missing file, unknown column, bad method string...) prints one line
``peftlab: error: ...`` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftlab.train.examples import DataError, Examples
from peftlab.train.report import (
    REPORT_FILE,
    format_bytes,
    format_number,
    format_table,
    summary_rows,
    versions,
    write_report,
)
from peftlab.train.tasks import TASKS


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the given exception types (plus data errors and missing files) into :class:`CliError`."""
    caught: tuple[type[BaseException], ...] = (DataError, FileNotFoundError, NotADirectoryError, *kinds)
    try:
        yield
    except caught as err:
        raise CliError(_one_line(err)) from err


# -- argument parsing ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``peftlab`` command."""
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,info,bench}")

    train = sub.add_parser("train", help="fine-tune a model with a PEFT method and save the adapter")
    train.add_argument("--model", default="minilm", help="zoo name (minilm, smollm2) or a Hugging Face model directory")
    train.add_argument("--task", help=f"registered task: {', '.join(TASKS)}")
    train.add_argument("--data", help="your own train file (.csv, .tsv, .jsonl, .json) instead of --task")
    train.add_argument("--eval-data", help="your own eval file (default: 10%% of --data held out)")
    train.add_argument("--text-cols", help="one or two comma-separated text columns of --data")
    train.add_argument("--label-col", help="label column of --data")
    train.add_argument("--label-kind", choices=("auto", "classification", "regression"), default="auto",
                       help="how to read --data labels (auto: non-integral numbers mean regression)")
    train.add_argument("--method", default="lora[r=8]", help='method string, e.g. "lora[r=8,alpha=16]"')
    train.add_argument("--out", required=True, help="directory for the adapter and report.json")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3, for adapters)")
    train.add_argument("--loraplus-ratio", type=float, default=1.0, help="LoRA+: lr of B = ratio x lr")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-ratio", type=float, default=0.06)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--max-length", type=int, default=128)
    train.add_argument("--train-limit", type=int, help="random subset of this many train examples")
    train.add_argument("--eval-limit", type=int, help="random subset of this many eval examples")
    train.add_argument("--eval-every", type=int, help="also evaluate (and checkpoint) every N steps")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    info = sub.add_parser("info", help="show what an adapter directory holds")
    info.add_argument("dir", help="adapter directory (written by peftlab train or pm.save)")

    sub.add_parser("bench", help="run the benchmark (arguments go to peftlab.bench)", add_help=False)
    return parser


# -- train ----------------------------------------------------------------------------------------

def _load_data(args: argparse.Namespace) -> tuple[Examples, Examples, str]:
    """Train and eval :class:`Examples` and a name for the data, from --task or --data."""
    from peftlab.train.data import load_file, load_task  # noqa: PLC0415

    if args.data:
        if not args.text_cols or not args.label_col:
            raise CliError("--data needs --text-cols and --label-col")
        cols = [c.strip() for c in args.text_cols.split(",") if c.strip()]
        train = load_file(args.data, cols, args.label_col, kind=args.label_kind)
        if args.eval_data:
            evals = load_file(args.eval_data, cols, args.label_col, kind=train.kind,
                              label_names=train.label_names or None, metrics=train.metrics)
        else:
            train, evals = train.split(0.1, seed=args.seed)
        return train.sample(args.train_limit, args.seed), evals.sample(args.eval_limit, args.seed), args.data
    if not args.task:
        raise CliError("give --task NAME (e.g. glue_sst2) or --data FILE with --text-cols and --label-col")
    train = load_task(args.task, "train", limit=args.train_limit, seed=args.seed)
    evals = load_task(args.task, "eval", limit=args.eval_limit, seed=args.seed)
    return train, evals, train.task or args.task


def _peftlab() -> Any:
    import peftlab  # noqa: PLC0415

    missing = [n for n in ("apply", "zoo") if not hasattr(peftlab, n)]
    if missing or not hasattr(peftlab.zoo, "load"):
        raise CliError("this peftlab build has no peftlab.apply / peftlab.zoo.load yet")
    return peftlab


def _load_model(peftlab: Any, name: str, examples: Examples, seed: int) -> tuple[Any, Any]:
    load = peftlab.zoo.load
    kwargs: dict[str, Any] = {"task": examples.kind, "num_labels": examples.num_labels}
    with contextlib.suppress(TypeError, ValueError):
        if "seed" in inspect.signature(load).parameters:
            kwargs["seed"] = seed
    with user_errors(ValueError, KeyError, OSError, ImportError):
        return load(name, **kwargs)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``peftlab train``: evaluate, apply the method, train, evaluate again, save, report."""
    from peftlab.train.data import head_module_names, make_loader  # noqa: PLC0415
    from peftlab.train.evaluation import evaluate_model  # noqa: PLC0415
    from peftlab.train.trainer import Trainer  # noqa: PLC0415

    started = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    train_ex, eval_ex, data_name = _load_data(args)
    peftlab = _peftlab()
    device = _device(args.device)
    model, tokenizer = _load_model(peftlab, args.model, train_ex, args.seed)
    with user_errors(ValueError):
        train_loader = make_loader(train_ex, tokenizer, args.batch_size, args.max_length, shuffle=True, seed=args.seed)
        eval_loader = make_loader(eval_ex, tokenizer, args.batch_size, args.max_length)
    model.to(device)
    before = evaluate_model(model, eval_loader, device)
    heads = head_module_names(model)
    # The task head is freshly initialised: the adapter must carry a trainable copy of it, unless
    # the method string already says which modules to save.
    overrides = {"modules_to_save": heads} if heads and "modules_to_save" not in args.method else {}
    with user_errors(ValueError, KeyError):
        pm = peftlab.apply(model, args.method, **overrides)
    groups = None
    if hasattr(peftlab, "param_groups"):
        groups = peftlab.param_groups(pm, lr=args.lr, loraplus_ratio=args.loraplus_ratio,
                                      weight_decay=args.weight_decay)
    trainer = Trainer(
        pm, train_loader, eval_loader, optimizer_groups=groups, lr=args.lr, epochs=args.epochs,
        max_steps=args.max_steps, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
        grad_accum=args.grad_accum, eval_every=args.eval_every,
        checkpoint_dir=out / "checkpoints" if args.eval_every else None,
        save_fn=pm.save if args.eval_every else None,
        progress=not args.no_progress, device=device, seed=args.seed,
    )
    result = trainer.train()
    pm.save(out)
    counts = pm.report()
    report = {
        "model": args.model, "task": data_name, "method": args.method,
        "method_resolved": counts.get("method"),
        **{k: counts.get(k) for k in ("trainable_params", "changed_params", "total_params",
                                       "ranks", "bytes_on_disk")},
        "adapter_report": counts, "head_modules": heads,
        "metric_names": list(train_ex.metrics), "metric": train_ex.metrics[0],
        "metric_before": before.get(train_ex.metrics[0]),
        "metric_after": (result["eval"] or {}).get(train_ex.metrics[0]),
        "metrics_before": before, "metrics_after": result["eval"],
        "train_examples": len(train_ex), "eval_examples": len(eval_ex),
        "label_names": train_ex.label_names, "kind": train_ex.kind,
        "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
        "loraplus_ratio": args.loraplus_ratio,
        **{k: v for k, v in result.items() if k != "eval"},
        "total_time_s": time.perf_counter() - started,
        "argv": list(argv), "seed": args.seed, "versions": versions(),
    }
    write_report(out, report)
    print(format_table(summary_rows(report), title=f"peftlab train -> {out}"))
    return 0


# -- info -----------------------------------------------------------------------------------------

def _tensor_count(path: Path) -> int | None:
    try:
        from safetensors import safe_open  # noqa: PLC0415

        total = 0
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= int(dim)
                total += n
        return total
    except Exception:  # noqa: BLE001 - info is best effort on a damaged file
        return None


def run_info(args: argparse.Namespace) -> int:
    """``peftlab info DIR``: the saved report as a table, else the adapter config and file sizes."""
    directory = Path(args.dir)
    if not directory.is_dir():
        raise CliError(f"adapter directory not found: {directory}")
    report_path = directory / REPORT_FILE
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError as err:
            raise CliError(f"{report_path} is not valid JSON ({err.msg}, line {err.lineno})") from err
        print(format_table(summary_rows(report), title=f"adapter {directory}"))
        return 0
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise CliError(f"{directory} has neither {REPORT_FILE} nor adapter_config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CliError(f"{config_path} is not valid JSON ({err.msg}, line {err.lineno})") from err
    fields = config.get("peftlab", config)
    rows = [(str(k), json.dumps(v) if not isinstance(v, str) else v)
            for k, v in fields.items() if v not in (None, [], {})]
    weights = directory / "adapter_model.safetensors"
    if weights.is_file():
        rows.append(("stored params", format_number(_tensor_count(weights))))
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        rows.append((path.name, format_bytes(path.stat().st_size)))
    print(format_table(rows, title=f"adapter {directory}"))
    return 0


# -- entry point ----------------------------------------------------------------------------------

def run_bench(argv: Sequence[str]) -> int:
    """``peftlab bench ...``: hand the arguments to ``peftlab.bench.cli.main``."""
    try:
        bench_cli = importlib.import_module("peftlab.bench.cli")
    except ImportError as err:
        raise CliError(f"peftlab bench is not available in this install ({_one_line(err)})") from err
    return int(bench_cli.main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``peftlab`` command with ``argv`` (default ``sys.argv[1:]``); returns 0 on success.

    User errors print ``peftlab: error: <reason>`` and raise ``SystemExit(2)``, as argparse does.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list[:1] == ["bench"]:
            return run_bench(args_list[1:])
        args = build_parser().parse_args(args_list)
        if args.command == "train":
            return run_train(args, args_list)
        return run_info(args)
    except (CliError, DataError) as err:
        print(f"peftlab: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
