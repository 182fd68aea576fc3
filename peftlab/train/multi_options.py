"""The options of ``peftlab train`` that ask for several adapters in one run, and how they pair.

Several adapters are asked for by repeating ``--method`` and ``--task``, paired in order (``--method
lora[r=8] --task sst2 --method ia3 --task stsb``; one of them given once goes with every adapter), or
by a list in the run config::

    adapters:
      - {name: sst2-r8, method: "lora[r=8]", task: sst2, lr: 5.0e-4}
      - {method: ia3, task: stsb, batch_size: 16, max_steps: 200}

where each entry may set the options of :data:`PER_ADAPTER` for that adapter (the others come from
the command line and the rest of the config). Bad input is a ``ValueError`` naming what was wrong.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from peftlab.core.config import config_parts, parse_method_string
from peftlab.train.runconfig import check_value, config_actions

DEFAULT_METHOD = "lora[r=8]"
#: ``--max-rows-per-forward all``: every adapter's micro-batch in one forward pass.
ONE_PASS = "all"
#: Options each adapter of a joint run may set for itself in the run config's ``adapters`` list.
PER_ADAPTER = ("method", "task", "data", "eval_data", "text_cols", "label_col", "label_kind", "no_header", "metrics",
               "lr", "loraplus_ratio", "weight_decay", "warmup_ratio", "warmup_steps", "lr_scheduler", "batch_size",
               "max_length", "epochs", "max_steps", "grad_accum", "train_limit", "eval_limit", "eval_every", "seed")
#: Options a joint run does not support yet, and why.
NOT_JOINT = {
    "resume": "resuming a joint run", "save_every": "step checkpoints of a joint run",
    "early_stopping_patience": "early stopping in a joint run", "fsdp": "FSDP for a joint run",
}


def add_multi_arguments(train: argparse.ArgumentParser) -> None:
    """The options of a joint run (and ``--no-dropout``, which single runs honour too)."""
    train.add_argument("--max-rows-per-forward", metavar="N|all",
                       help="several adapters: at most N rows per forward pass of a joint step, the rows of every "
                            "adapter ordered by length so that a pass pads little (default: the largest adapter "
                            "batch, which keeps memory near one run's); all: every adapter's micro-batch in one "
                            "pass, padded to the longest row of all")
    train.add_argument("--no-dropout", action="store_true",
                       help="turn the model's dropout off (a joint run then trains each adapter exactly as a run of "
                            "its own would)")


def rows_option(value: Any) -> int | str | None:
    """``--max-rows-per-forward`` checked: an integer N >= 1, ``"all"``, or None (not given); a
    ``ValueError`` naming the option otherwise."""
    if value is None or value == ONE_PASS:
        return value
    try:
        rows = int(value)
    except (TypeError, ValueError):
        rows = 0
    if rows < 1 or str(rows) != str(value).strip():
        raise ValueError(f"--max-rows-per-forward must be a number of rows >= 1 or {ONE_PASS}, got {value!r}")
    return rows


def max_rows_for(value: Any, batch_sizes: list[int]) -> int | None:
    """The rows per forward pass of a joint run: N as given, None (one pass) for ``all``, and when
    not given the largest of the adapters' batch sizes: each pass then holds no more rows than the
    largest single run's batch, so activation memory stays near one run's."""
    rows = rows_option(value)
    if rows == ONE_PASS:
        return None
    return int(rows) if rows is not None else max(batch_sizes)


def as_list(value: Any) -> list[Any]:
    """An option that may be given several times, as a list (None: empty)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def requested_adapters(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The per-adapter options when ``args`` ask for several adapters, else None.

    ``--method`` and ``--task`` may be repeated (paired in order; one given once goes with every
    adapter), or the run config holds an ``adapters`` list (an entry without ``method`` / ``task``
    takes the one given once). Each entry has ``method`` and ``task``. For a single run
    ``args.method`` and ``args.task`` are left as one string each (``args.method`` defaults to
    :data:`DEFAULT_METHOD`)."""
    methods, tasks = as_list(args.method), as_list(args.task)
    entries = getattr(args, "adapters", None)
    if entries:
        if len(methods) > 1 or len(tasks) > 1:
            raise ValueError("give the adapters either as an adapters list in the run config or by repeating "
                             "--method and --task, not both")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError("adapters (run config) must be a list of mappings, e.g. - {method: lora, task: sst2}")
        defaults = {"method": methods[0] if methods else DEFAULT_METHOD, "task": tasks[0] if tasks else None}
        return [{**defaults, **_checked_entry(i, entry)} for i, entry in enumerate(entries)]
    count = max(len(methods), len(tasks))
    if count <= 1:
        args.method = methods[0] if methods else DEFAULT_METHOD
        args.task = tasks[0] if tasks else None
        return None
    if len(methods) > 1 and len(tasks) > 1 and len(methods) != len(tasks):
        raise ValueError(f"--method is given {len(methods)} times and --task {len(tasks)} times: pair them one to "
                         "one (or give one of them once, for every adapter)")
    methods = methods if len(methods) == count else (methods or [DEFAULT_METHOD]) * count
    tasks = tasks if len(tasks) == count else (tasks or [None]) * count
    return [{"method": m, "task": t} for m, t in zip(methods, tasks)]


def _checked_entry(index: int, entry: dict[Any, Any]) -> dict[str, Any]:
    """One ``adapters`` entry with keys read as option names and values checked as the command line
    would; an unknown key is an error naming it and the keys an entry may hold."""
    from peftlab.train.cli import add_train_arguments  # noqa: PLC0415 - the parser defines the options' types

    actions = config_actions(add_train_arguments)
    out: dict[str, Any] = {}
    for raw_key, value in entry.items():
        key = str(raw_key).replace("-", "_")
        source = f"adapters[{index}]"
        if key == "name":
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
                raise ValueError(f"{source}: name must be letters, digits, _ or - (it names the adapter and "
                                 f"its folder), got {value!r}")
            out[key] = value
        elif key in PER_ADAPTER and key in actions:
            value = check_value(key, value, actions[key], source)
            out[key] = value[0] if key in ("method", "task") and isinstance(value, list) and len(value) == 1 else value
            if isinstance(out[key], list) and key in ("method", "task"):
                raise ValueError(f"{source}: {key} must be one value per adapter, got {value!r}")
        else:
            raise ValueError(f"{source}: unknown key {raw_key!r}; an adapter may set name, {', '.join(PER_ADAPTER)}")
    return out


def _short(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "adapter"


def adapter_name(given: str | None, method: str, data_name: str, taken: set[str]) -> str:
    """The adapter's ``given`` name, else ``<task>-<method>`` (``sst2-lora``), numbered when taken."""
    if given:
        if given in taken:
            raise ValueError(f"two adapters are named {given!r}; names must differ")
        return given
    task = Path(data_name).stem if "/" in data_name or "." in data_name else data_name
    task = task.removeprefix("glue_").removesuffix("_subset")
    parts = "+".join(p.method for p in config_parts(parse_method_string(method)))
    base = _short(f"{task}-{parts}")
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def refuse_unsupported(args: argparse.Namespace) -> None:
    """A ``ValueError`` for options a joint run does not support yet (:data:`NOT_JOINT`, several
    processes)."""
    for key, what in NOT_JOINT.items():
        if getattr(args, key, None):
            raise ValueError(f"--{key.replace('_', '-')}: {what} is not supported yet; train the adapters one at a "
                             "time")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a joint run of several adapters runs in one process; launch it without torchrun / accelerate")


