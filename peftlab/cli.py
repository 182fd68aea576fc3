"""The ``peftlab`` command: ``train`` an adapter, show its ``info``, run the ``bench``, list the
registered ``methods``, ``serve`` a model and its adapters.

This module only dispatches: each subcommand's arguments and implementation live in its own layer
(``train`` and ``info`` in :mod:`peftlab.train.cli`, ``bench`` in :mod:`peftlab.bench.cli`, ``serve``
and ``bench serve`` in :mod:`peftlab.serve.cli` and :mod:`peftlab.serve.bench.cli`), and those layers
never import this one. Only ``methods``, which reads the registry, is implemented here.

Bad input (unknown task, missing file, unknown column, bad method string, a method that does not
apply to the model, a ``--device`` this machine lacks...) prints one line ``peftlab: error: ...``
to stderr and exits with status 2. ``--help`` shows every option's default; ``--version`` prints
the version.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from peftlab import __version__
from peftlab.core.registry import method_specs
from peftlab.train.cli import (
    INFO_HELP,
    TRAIN_HELP,
    CliError,
    DefaultsHelpFormatter,
    add_info_arguments,
    add_train_arguments,
    one_line,
    run_info,
    run_train,
)
from peftlab.train.eval_cli import (
    EVAL_HELP,
    GENERATE_HELP,
    add_eval_arguments,
    add_generate_arguments,
    run_eval,
    run_generate,
)
from peftlab.train.examples import DataError

BENCH_HELP = "run the benchmark (arguments go to peftlab.bench)"
METHODS_HELP = "list the registered PEFT methods (name, family, sites, merges, default lr, ...)"
SERVE_HELP = "serve the model and its adapters over an OpenAI-compatible HTTP API (arguments go to peftlab.serve)"
OFFSITE_HELP = "Offsite-Tuning: emulate (cut a lossy emulator), plug (trained adapter blocks back into the model)"
SPLIT_HELP = "split training (DLoRA): serve (the frozen model), train (data and adapter in another process)"
#: Subcommands that parse their own arguments: {name: the module whose main() runs them}.
OWN_PARSERS = {"offsite": "peftlab.train.offsite.cli", "split": "peftlab.train.split.cli"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``peftlab`` command (``bench`` parses its own arguments)."""
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning.",
                                     epilog="peftlab COMMAND --help shows a command's options and their defaults.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,info,eval,generate,bench,methods,serve,offsite,split}")
    add_train_arguments(sub.add_parser("train", help=TRAIN_HELP, description=TRAIN_HELP,
                                       formatter_class=DefaultsHelpFormatter))
    add_info_arguments(sub.add_parser("info", help=INFO_HELP, description=INFO_HELP,
                                      formatter_class=DefaultsHelpFormatter))
    add_eval_arguments(sub.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP,
                                      formatter_class=DefaultsHelpFormatter))
    add_generate_arguments(sub.add_parser("generate", help=GENERATE_HELP, description=GENERATE_HELP,
                                          formatter_class=DefaultsHelpFormatter))
    sub.add_parser("bench", help=BENCH_HELP, add_help=False)
    sub.add_parser("serve", help=SERVE_HELP, add_help=False)
    sub.add_parser("offsite", help=OFFSITE_HELP, add_help=False)
    sub.add_parser("split", help=SPLIT_HELP, add_help=False)
    methods = sub.add_parser("methods", help=METHODS_HELP, description=METHODS_HELP,
                             formatter_class=DefaultsHelpFormatter)
    methods.add_argument("--json", action="store_true", help="print the registry as a JSON list")
    return parser


# -- methods --------------------------------------------------------------------------------------

def method_records() -> list[dict[str, Any]]:
    """One plain-JSON record per registered method, sorted by name."""
    return [
        {
            "name": spec.name,
            "family": spec.family,
            "sites": list(spec.sites),
            "merges": spec.merges,
            "per_row": spec.per_row,
            "peft_type": spec.peft.peft_type if spec.peft is not None else None,
            "default_lr": spec.default_lr,
            "example": spec.example,
        }
        for spec in method_specs()
    ]


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows))


def run_methods(args: argparse.Namespace) -> int:
    """``peftlab methods [--json]``: the method registry as a table, or as JSON."""
    records = method_records()
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    header = ("name", "family", "sites", "merges", "per-row batching", "PEFT type", "default lr", "example")
    yes_no = {True: "yes", False: "no"}
    rows = [(r["name"], r["family"], ",".join(r["sites"]), yes_no[r["merges"]], yes_no[r["per_row"]],
             r["peft_type"] or "-", f"{r['default_lr']:g}", r["example"]) for r in records]
    print(_columns(header, rows))
    return 0


# -- entry point ----------------------------------------------------------------------------------

def _run_module(module: str, command: str, argv: Sequence[str]) -> int:
    """Hand ``argv`` to ``module.main`` (imported only now: its extra dependencies may be missing)."""
    try:
        command_cli = importlib.import_module(module)
    except ImportError as err:
        raise CliError(f"{command} is not available in this install ({one_line(err)})") from err
    return int(command_cli.main(list(argv)) or 0)


def run_bench(argv: Sequence[str]) -> int:
    """``peftlab bench ...``: hand the arguments to ``peftlab.bench.cli.main``; ``bench serve``, the
    serving load benchmark, lives in the serve layer above bench (``peftlab.serve.bench.cli``)."""
    if list(argv[:1]) == ["serve"]:
        return _run_module("peftlab.serve.bench.cli", "peftlab bench serve (pip install 'peftlab[serve]')", argv[1:])
    if list(argv[:1]) in (["offsite"], ["split"]):  # their own modules: Offsite-Tuning, split training
        return _run_module(f"peftlab.bench.{argv[0]}", f"peftlab bench {argv[0]}", argv[1:])
    return _run_module("peftlab.bench.cli", "peftlab bench", argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``peftlab`` command with ``argv`` (default ``sys.argv[1:]``); returns 0 on success.

    User errors print ``peftlab: error: <reason>`` and raise ``SystemExit(2)``, as argparse does.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list[:1] == ["bench"]:
            return run_bench(args_list[1:])
        if args_list[:1] == ["serve"]:
            return _run_module("peftlab.serve.cli", "peftlab serve (pip install 'peftlab[serve]')", args_list[1:])
        if args_list[:1] and args_list[0] in OWN_PARSERS:
            return _run_module(OWN_PARSERS[args_list[0]], f"peftlab {args_list[0]}", args_list[1:])
        args = build_parser().parse_args(args_list)
        if args.command == "train":
            return run_train(args, args_list)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "methods":
            return run_methods(args)
        return run_info(args)
    except (CliError, DataError) as err:
        print(f"peftlab: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
