"""``peftlab eval DIR`` (the metric of a saved adapter on a task or a file) and ``peftlab generate DIR``
(text from a saved adapter over its base). Both find the base model and the run's settings in the
adapter directory: ``report.json`` written by ``peftlab train`` (model, task kind, label names,
prompt format, answer regex, max length), else ``adapter_config.json``'s ``base_model_name_or_path``.
Errors raise :class:`~peftlab.train.cli.CliError` (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

from peftlab.train.cli import CliError, add_data_arguments, check_device, user_errors
from peftlab.train.examples import GENERATIVE_KINDS, Examples
from peftlab.train.report import REPORT_FILE, format_number, format_table, honesty_rows, json_safe
from peftlab.train.task_setup import (
    add_file_arguments,
    add_generative_arguments,
    generative_metrics,
    metrics_of,
    task_report,
)

EVAL_HELP = "the metric of a saved adapter on a task or a data file"
GENERATE_HELP = "generate text from a saved adapter over its base model"


def _adapter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="adapter directory written by peftlab train (or pm.save)")
    parser.add_argument("--model", help="base model (zoo name or directory; default: the one the adapter names)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``peftlab eval``: the adapter, then the data options ``train`` has."""
    _adapter_arguments(parser)
    parser.add_argument("--task", help="registered task: its eval split (default: the task the adapter was trained on)")
    add_data_arguments(parser, "instead of --task (all of it is evaluated)")
    add_file_arguments(parser)
    add_generative_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    parser.add_argument("--max-length", type=int, help="tokens per example (default: the training run's, else 128)")
    parser.add_argument("--eval-limit", type=int, help="random subset of this many examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --eval-limit subset")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--base", action="store_true", help="score the base model alone (the adapter disabled), "
                                                            "for comparison")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``peftlab generate``."""
    _adapter_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True,
                        help="the prompt (repeat for several); formatted as in training (chat template or plain)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest token set of this mass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--prompt-format", choices=("auto", "chat", "plain"),
                        help="override the training run's prompt format")


def run_record(directory: Path) -> dict[str, Any]:
    """What the adapter directory says about its run: ``report.json`` when present, else the base
    model named in ``adapter_config.json``. Raises :class:`CliError` for a directory with neither."""
    if not directory.is_dir():
        raise CliError(f"adapter directory not found: {directory}")
    report = directory / REPORT_FILE
    if report.is_file():
        try:
            return json.loads(report.read_text())
        except json.JSONDecodeError as err:
            raise CliError(f"{report} is not valid JSON ({err.msg}, line {err.lineno})") from err
    config = directory / "adapter_config.json"
    if not config.is_file():
        raise CliError(f"{directory} holds no adapter (neither {REPORT_FILE} nor adapter_config.json)")
    return {"model": json.loads(config.read_text()).get("base_model_name_or_path")}


def _base_name(args: argparse.Namespace, record: dict[str, Any]) -> str:
    name = args.model or record.get("model")
    if not name:
        raise CliError(f"{args.dir} does not name its base model; give --model")
    return str(name)


def load_adapter(directory: Path, model_name: str, kind: str, num_labels: int | None, device: str) -> tuple[Any, Any]:
    """(PeftModel in eval mode on ``device``, tokenizer): the base loaded for ``kind`` with the
    adapter of ``directory`` (its saved task head too) placed over it."""
    import peftlab  # noqa: PLC0415

    with user_errors(ValueError, KeyError, OSError, ImportError):
        model, tokenizer = peftlab.zoo.load(model_name, task=kind, num_labels=num_labels)
        pm = peftlab.load(model, directory)
    pm.to(device)
    pm.eval()
    return pm, tokenizer


def _eval_examples(args: argparse.Namespace, record: dict[str, Any]) -> Examples:
    """The examples ``peftlab eval`` scores: a task's eval split, or all of --data, read with the
    training run's label names (so class ids agree with the trained head)."""
    from peftlab.train.data import load_file, load_task  # noqa: PLC0415
    from peftlab.train.instruct_data import (  # noqa: PLC0415
        generative_kind,
        is_generative_task,
        load_generative_file,
        load_generative_task,
    )
    from peftlab.train.task_setup import answer_regex_of  # noqa: PLC0415

    kind = record.get("kind")
    header = not args.no_header
    generative = kind in GENERATIVE_KINDS or is_generative_task(args.task) or bool(args.prompt_col)
    if generative:
        kind = kind if kind in GENERATIVE_KINDS else generative_kind(_base_name(args, record))
        metrics = generative_metrics(answer_regex_of(args))
        if args.data:
            examples = load_generative_file(args.data, args.prompt_col, args.response_col, kind, header, metrics)
        else:
            examples = load_generative_task(args.task, kind, metrics)[1]
    elif args.data:
        if not args.text_cols or not args.label_col:
            raise CliError("--data needs --text-cols and --label-col (or --prompt-col and --response-col)")
        cols = [c.strip() for c in args.text_cols.split(",") if c.strip()]
        names = record.get("label_names") or None
        examples = load_file(args.data, cols, args.label_col, kind=kind or args.label_kind, label_names=names,
                             metrics=metrics_of(args) or record.get("metric_names"), header=header)
    else:
        examples = load_task(args.task, "eval")
    return examples.sample(args.eval_limit, args.seed)


def _is_registered(task: Any) -> bool:
    from peftlab.train.instruct_data import is_generative_task  # noqa: PLC0415
    from peftlab.train.tasks import TASKS  # noqa: PLC0415

    return isinstance(task, str) and (task in TASKS or is_generative_task(task))


def run_eval(args: argparse.Namespace) -> int:
    """``peftlab eval DIR``: load the base and the adapter, score the eval data, print (and write) it."""
    from peftlab.train.data import make_loader  # noqa: PLC0415
    from peftlab.train.evaluation import evaluate_model  # noqa: PLC0415
    from peftlab.train.generative_data import make_generative_loader  # noqa: PLC0415
    from peftlab.train.task_setup import generative_dataset  # noqa: PLC0415

    directory = Path(args.dir)
    record = run_record(directory)
    device = check_device(args.device)
    args.data = args.data or args.eval_data
    if not args.task and not args.data:
        args.task = record.get("task") if _is_registered(record.get("task")) else None
        if not args.task:
            raise CliError("give --task NAME or --data FILE (the adapter's run names no registered task)")
    if args.answer_regex is None:
        args.answer_regex = record.get("answer_regex")  # exact match as the training run scored it
    args.max_length = args.max_length or record.get("max_length") or 128
    with user_errors(ValueError):
        examples = _eval_examples(args, record)
    kind = examples.kind
    pm, tokenizer = load_adapter(directory, _base_name(args, record), kind, examples.num_labels, device)
    with user_errors(ValueError):
        if examples.is_generative:
            fmt = args.prompt_format if args.prompt_format != "auto" else record.get("prompt_format") or "auto"
            loader = make_generative_loader(generative_dataset(args, examples, pm, tokenizer, fmt), args.batch_size)
        else:
            loader = make_loader(examples, tokenizer, args.batch_size, args.max_length)
    with pm.disable_adapters() if args.base else contextlib.nullcontext():
        result = evaluate_model(pm, loader, device)
    summary: dict[str, Any] = {"adapter": None if args.base else str(directory), "model": _base_name(args, record),
                               "kind": kind, "data": args.data or examples.task, "metric_names": examples.metrics,
                               "metric": examples.metrics[0], "metrics": result,
                               **task_report(examples, examples, (loader,), result)}
    rows = [(name, format_number(result.get(name))) for name in examples.metrics]
    rows += [("eval loss", format_number(result.get("loss"))), ("examples", format_number(result.get("examples")))]
    title = f"peftlab eval {directory}" + (" (base model alone, adapter disabled)" if args.base else "")
    print(format_table(rows + honesty_rows(summary), title=title))
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """``peftlab generate DIR --prompt ...``: each prompt's continuation, printed one after another."""
    from peftlab.train.generation import generate_continuations  # noqa: PLC0415
    from peftlab.train.generative_data import prompt_ids  # noqa: PLC0415
    from peftlab.train.instruct_data import generative_kind  # noqa: PLC0415
    from peftlab.train.prompts import choose_format  # noqa: PLC0415

    directory = Path(args.dir)
    record = run_record(directory)
    device = check_device(args.device)
    name = _base_name(args, record)
    with user_errors(ValueError):
        kind = record.get("kind") if record.get("kind") in GENERATIVE_KINDS else generative_kind(name)
    pm, tokenizer = load_adapter(directory, name, kind, None, device)
    with user_errors(ValueError):
        fmt = choose_format(tokenizer, kind, args.prompt_format or record.get("prompt_format") or "auto")
        ids = [prompt_ids(tokenizer, prompt, fmt) for prompt in args.prompt]
        texts = generate_continuations(pm, tokenizer, ids, args.max_new_tokens, device, temperature=args.temperature,
                                       top_p=args.top_p, seed=args.seed, progress=not args.no_progress)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- prompt {i + 1}")
        print(text)
    return 0
