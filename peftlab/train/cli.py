"""The ``train`` and ``info`` subcommands of the ``peftlab`` command (dispatched by :mod:`peftlab.cli`).

This layer defines their arguments (:func:`add_train_arguments`, :func:`add_info_arguments`) and
runs them (:func:`run_train`, :func:`run_info`); it never imports :mod:`peftlab.cli`. Bad input
(unknown task, missing file, unknown column, bad method string, a method that does not apply to the
model, a ``--device`` this machine lacks...) raises :class:`CliError`, which
the ``peftlab`` command prints as one line ``peftlab: error: ...`` to stderr, exiting with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import peftlab
from peftlab.core.config import adapter_method, config_parts, parse_method_string
from peftlab.core.io import PEFTLAB_CONFIG_NAME
from peftlab.core.registry import get_method
from peftlab.train.distributed import ProcessesError, add_distributed_arguments, check_fsdp_options, start_processes
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
from peftlab.train.instruct_data import GENERATIVE_TASKS
from peftlab.train.task_setup import (
    add_file_arguments,
    add_generative_arguments,
    load_generative_data,
    metrics_of,
    task_loaders,
    task_report,
    wants_generative,
)
from peftlab.train.run_options import (
    add_run_arguments,
    check_early_stopping_metric,
    check_run_options,
    checkpoint_to_resume,
    checkpoints_enabled,
    clear_finished_checkpoints,
    refuse_unfinished_run,
    trainer_run_options,
)
from peftlab.train.runconfig import config_actions, resolve_run_args, write_run_config
from peftlab.train.dropout import disable_dropout
from peftlab.train.multi_options import add_multi_arguments, requested_adapters
from peftlab.train.tasks import TASKS
from peftlab.zoo.seeding import seeded


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a KeyError's message without its quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the given exception types (plus data errors and missing files) into :class:`CliError`."""
    caught: tuple[type[BaseException], ...] = (DataError, FileNotFoundError, NotADirectoryError, *kinds)
    try:
        yield
    except caught as err:
        raise CliError(one_line(err)) from err


# -- argument parsing ---------------------------------------------------------------------------

TRAIN_HELP = "fine-tune a model with a PEFT method and save the adapter"
INFO_HELP = "show what an adapter directory holds"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default as "(default: ...)", except where there is nothing to
    show (no default, a flag that is off) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text:  # 0 is shown
            return text
        return super()._get_help_string(action) or text


def check_device(name: str, kinds: Sequence[str] = ("cpu", "cuda", "mps")) -> str:
    """``--device``: ``auto`` becomes cuda when available, else cpu; any other name must be a device
    of one of ``kinds`` that this machine has. Raises :class:`CliError` (one line) otherwise."""
    import torch  # noqa: PLC0415

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    choices = f"auto, {', '.join(kinds)}" + (" or cuda:N" if "cuda" in kinds else "")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name}: not a device name; use {choices}") from None
    if device.type not in kinds:
        raise CliError(f"--device {name}: this command runs on {choices}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CliError(f"--device {name}: CUDA is not available on this machine ({why}, torch "
                           f"{torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CliError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {name}: Apple's MPS backend is not available on this machine; "
                       "use --device cpu or auto")
    return name


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    """The arguments of ``peftlab train``, added to ``train`` (its subparser)."""
    train.add_argument("--model", default="minilm", help="zoo name (minilm, smollm2) or a Hugging Face model directory")
    train.add_argument("--task", action="append",
                       help=f"registered task: {', '.join(TASKS)}; the glue_ prefix, case and '-' may be "
                            "left out (sst2, SST-2 and glue_sst2 are one task; mnli is glue_mnli_subset); "
                            f"instruction tuning: {', '.join(GENERATIVE_TASKS)}; repeated with --method: one "
                            "adapter per pair, trained in one run")
    add_data_arguments(train, "instead of --task")
    add_file_arguments(train)
    add_generative_arguments(train)
    train.add_argument("--method", action="append",
                       help='method string, e.g. "lora[r=8,alpha=16]" (default: lora[r=8]); repeat --method (paired '
                            "in order with --task) to train several adapters over one base in one run")
    train.add_argument("--out", help="directory for the adapter and report.json (required: here or in --config)")
    train.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default: the method's default_lr, see peftlab methods; "
                            "for a union a+b, that of its first part)")
    train.add_argument("--loraplus-ratio", type=float, default=1.0, help="LoRA+: lr of B = ratio x lr")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--warmup-ratio", type=float, default=0.06, help="share of the steps spent warming up the lr")
    train.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    train.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    train.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are cut)")
    train.add_argument("--train-limit", type=int, help="random subset of this many train examples")
    train.add_argument("--eval-limit", type=int, help="random subset of this many eval examples")
    train.add_argument("--eval-every", type=int, help="also evaluate (and checkpoint) every N steps")
    train.add_argument("--seed", type=int, default=0, help="seed of the data order, subsets and the adapter's init")
    train.add_argument("--device", default="auto",
                       help="auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps; a device this machine "
                            "lacks is an error")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_arguments(train)
    add_run_arguments(train)
    add_multi_arguments(train)


def add_data_arguments(parser: argparse.ArgumentParser, data_note: str) -> None:
    """``--data``, ``--eval-data``, ``--text-cols``, ``--label-col``, ``--label-kind``: a user's own
    files, read by :func:`_load_data` (``peftlab train`` and ``peftlab bench methods`` share them)."""
    parser.add_argument("--data", help=f"your own train file (.csv, .tsv, .jsonl, .json) {data_note}")
    parser.add_argument("--eval-data", help="your own eval file (default: 10%% of --data held out)")
    parser.add_argument("--text-cols", help="one or two comma-separated text columns of --data")
    parser.add_argument("--label-col", help="label column of --data")
    parser.add_argument("--label-kind", choices=("auto", "classification", "regression"), default="auto",
                        help="how to read --data labels (auto: non-integral numbers mean regression)")


def add_info_arguments(info: argparse.ArgumentParser) -> None:
    """The arguments of ``peftlab info``, added to ``info`` (its subparser)."""
    info.add_argument("dir", help="adapter directory (written by peftlab train or pm.save)")


# -- train ----------------------------------------------------------------------------------------

def _load_data(args: argparse.Namespace) -> tuple[Examples, Examples, str]:
    """Train and eval :class:`Examples` and a name for the data, from --task or --data."""
    from peftlab.train.data import load_file, load_task  # noqa: PLC0415

    if wants_generative(args):
        with user_errors(ValueError):
            return load_generative_data(args)
    if args.data:
        if not args.text_cols or not args.label_col:
            raise CliError("--data needs --text-cols and --label-col (classification, regression), or "
                           "--prompt-col and --response-col (instruction tuning; an Alpaca file needs neither)")
        cols = [c.strip() for c in args.text_cols.split(",") if c.strip()]
        header = not getattr(args, "no_header", False)
        train = load_file(args.data, cols, args.label_col, kind=args.label_kind, header=header, metrics=metrics_of(args))
        if args.eval_data:
            evals = load_file(args.eval_data, cols, args.label_col, kind=train.kind,
                              label_names=train.label_names or None, metrics=train.metrics, header=header)
        else:
            train, evals = train.split(0.1, seed=args.seed)
        return train.sample(args.train_limit, args.seed), evals.sample(args.eval_limit, args.seed), args.data
    if not args.task:
        raise CliError("give --task NAME (e.g. glue_sst2) or --data FILE with --text-cols and --label-col")
    train = load_task(args.task, "train", limit=args.train_limit, seed=args.seed)
    evals = load_task(args.task, "eval", limit=args.eval_limit, seed=args.seed)
    return train, evals, train.task or args.task


def _load_model(name: str, examples: Examples) -> tuple[Any, Any]:
    # A fresh task head is initialised with a fixed seed by the zoo, so every load gives the same model.
    with user_errors(ValueError, KeyError, OSError, ImportError):
        return peftlab.zoo.load(name, task=examples.kind, num_labels=examples.num_labels)


def method_default_lr(method: str) -> float:
    """The ``default_lr`` the registry declares for ``method`` (a method string; for a union
    ``a[...]+b[...]``, that of its first part)."""
    with user_errors(ValueError, KeyError):
        first = config_parts(parse_method_string(method))[0]
        return get_method(adapter_method(first)).default_lr  # qlora[...]: lora's


def run_train(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """``peftlab train``: evaluate, apply the method, train, evaluate again, save, report.

    ``argv`` (recorded in the report; default ``sys.argv[1:]``) is the command line that gave ``args``.
    Without ``--lr`` the method's registered ``default_lr`` is used; the report records the lr used.
    """
    from peftlab.train.data import head_module_names  # noqa: PLC0415
    from peftlab.train.evaluation import evaluate_model  # noqa: PLC0415
    from peftlab.train.checkpoint import CheckpointError  # noqa: PLC0415
    from peftlab.train.trainer import Trainer, bf16_unavailable_reason  # noqa: PLC0415

    started = time.perf_counter()
    command_line = list(sys.argv[1:] if argv is None else argv)
    with user_errors(ValueError):  # --config and --resume fill the options not given
        args = resolve_run_args(args, command_line[command_line[:1] == ["train"]:], add_train_arguments)
        check_run_options(args)
        several = requested_adapters(args)  # repeated --method/--task, or adapters: in the run config
    if not args.out:
        raise CliError("give --out DIR (or out: DIR in the --config file)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    if several:
        from peftlab.train.multi_cli import run_multi  # noqa: PLC0415

        return run_multi(args, several, command_line)
    device = check_device(args.device)  # before anything is loaded
    with user_errors(ProcessesError):  # under torchrun / accelerate launch: join the other processes
        processes = start_processes(device, fsdp=args.fsdp)
        check_fsdp_options(processes, args)
    device = str(processes.device)  # several processes on CUDA: cuda:LOCAL_RANK
    if args.bf16 and bf16_unavailable_reason(device):
        raise CliError(f"--bf16: {bf16_unavailable_reason(device)}")
    with user_errors(ValueError):
        resume_from = checkpoint_to_resume(out) if args.resume else refuse_unfinished_run(out)
    with user_errors(ValueError, KeyError):
        parts = config_parts(parse_method_string(args.method))
    lr = args.lr if args.lr is not None else method_default_lr(args.method)
    lr_source = "--lr" if args.lr is not None else "method default"
    train_ex, eval_ex, data_name = _load_data(args)
    model, tokenizer = _load_model(args.model, train_ex)
    if args.no_dropout:
        disable_dropout(model)
    with user_errors(ValueError):  # NotApplicableError (bitfit on Llama...) before the first evaluation
        for part in parts:
            get_method(adapter_method(part)).check_applicable(model)
    with user_errors(ValueError):
        train_loader, eval_loader = task_loaders(args, train_ex, eval_ex, model, tokenizer)
        train_loader, eval_loader = processes.shard_train(train_loader), processes.shard_eval(eval_loader, train_ex.kind)
    model.to(device)
    before = evaluate_model(model, eval_loader, device, gather=processes.eval_gather(eval_loader))
    with user_errors(ValueError):
        check_early_stopping_metric(args, before)
    heads = [] if train_ex.is_generative else head_module_names(model)  # an LM's own head is pretrained
    # The task head is freshly initialised: the adapter must carry a trainable copy of it, unless
    # the method string already says which modules to save.
    overrides = {"modules_to_save": heads} if heads and "modules_to_save" not in args.method else {}
    with user_errors(ValueError, KeyError), seeded(args.seed):  # --seed fixes the adapter's init
        pm = peftlab.apply(model, args.method, **overrides)
    with user_errors(ProcessesError, ValueError):  # DDP, or FSDP (which replaces the parameters: groups after)
        trained = processes.prepare(pm)
    groups = peftlab.param_groups(pm, lr=lr, loraplus_ratio=args.loraplus_ratio, weight_decay=args.weight_decay)
    with user_errors(ValueError):  # e.g. --gradient-checkpointing on a model without it
        trainer = Trainer(
            trained, train_loader, eval_loader, optimizer_groups=groups, lr=lr, epochs=args.epochs,
            max_steps=args.max_steps, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
            grad_accum=args.grad_accum, eval_every=args.eval_every,
            save_fn=pm.save if checkpoints_enabled(args) else None, resume_from=resume_from,
            progress=not args.no_progress, device=device, seed=args.seed, **trainer_run_options(args, out),
            processes=processes,
        )
    if resume_from is None and processes.is_main:
        clear_finished_checkpoints(out)
        write_run_config(out, args, config_actions(add_train_arguments))
    with user_errors(CheckpointError):  # a checkpoint of another model, method or schedule
        result = trainer.train()
    with processes.full_adapters():  # FSDP: the adapter gathered from its shards (every process)
        if processes.is_main:
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
        "batch_size": args.batch_size, "max_length": args.max_length, "lr": lr, "lr_source": lr_source,
        "loraplus_ratio": args.loraplus_ratio,
        **{k: v for k, v in result.items() if k != "eval"},
        "total_time_s": time.perf_counter() - started,
        "argv": command_line, "seed": args.seed, "versions": versions(),
        "no_header": bool(getattr(args, "no_header", False)),
        **task_report(train_ex, eval_ex, (train_loader, eval_loader), result["eval"]),
        "processes": {**processes.describe(), "global_batch": args.batch_size * args.grad_accum * processes.world_size},
    }
    if processes.is_main:
        write_report(out, report)
        print(format_table(summary_rows(report), title=f"peftlab train -> {out}"))
    processes.close()
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
        if isinstance(report.get("adapters"), dict):  # the OUT of a joint run: its adapters are in OUT/<name>
            from peftlab.train.multi_report import joint_table  # noqa: PLC0415

            print(joint_table(report))
            return 0
        print(format_table(summary_rows(report), title=f"adapter {directory}"))
        return 0
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise CliError(f"{directory} has neither {REPORT_FILE} nor adapter_config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CliError(f"{config_path} is not valid JSON ({err.msg}, line {err.lineno})") from err
    # Our full config lives in peftlab_config.json (older files kept it inside adapter_config.json).
    own_path = directory / PEFTLAB_CONFIG_NAME
    own = json.loads(own_path.read_text()).get("peftlab") if own_path.is_file() else None
    fields = own or config.get("peftlab", config)
    rows = [(str(k), json.dumps(v) if not isinstance(v, str) else v)
            for k, v in fields.items() if v not in (None, [], {})]
    weights = directory / "adapter_model.safetensors"
    if weights.is_file():
        rows.append(("stored params", format_number(_tensor_count(weights))))
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        rows.append((path.name, format_bytes(path.stat().st_size)))
    print(format_table(rows, title=f"adapter {directory}"))
    return 0
