"""What differs between the task kinds of a ``peftlab train`` / ``peftlab eval`` run: their command
line options, which data a run reads, its loaders, and the report fields each kind adds.

Kinds: ``classification`` and ``regression`` (``--task`` a GLUE name, or ``--data`` with
``--text-cols`` / ``--label-col``), and the generative ones, ``causal-lm`` instruction tuning or
``seq2seq`` (``--task alpaca|gsm8k``, or ``--data`` with ``--prompt-col`` / ``--response-col`` or
Alpaca's own fields; which of the two follows from the model, see
:func:`~peftlab.train.instruct_data.generative_kind`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from peftlab.train.answers import compile_answer_regex
from peftlab.train.baselines import baseline_check, constant_baseline
from peftlab.train.examples import DataError, Examples
from peftlab.train.generative_data import (
    GenerationSettings,
    GenerativeDataset,
    context_length,
    encode_generative,
    make_generative_loader,
)
from peftlab.train.instruct_data import (
    ALPACA_FIELDS,
    generative_kind,
    get_generative_task,
    is_generative_task,
    load_generative_file,
    load_generative_task,
)
from peftlab.train.prompts import PROMPT_FORMATS, choose_format

#: How many bytes of a --data file are read to see whether it has Alpaca's fields.
_SNIFF_BYTES = 65536


def add_generative_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prompt-col``, ``--response-col``, ``--answer-regex``, ``--prompt-format``, ``--max-new-tokens``."""
    parser.add_argument("--prompt-col", help="prompt column of --data: instruction tuning (causal LM) or seq2seq")
    parser.add_argument("--response-col", help="response column of --data (the loss is taken on it only)")
    parser.add_argument("--answer-regex", help="also score exact match of the final answer: group 1 of the last "
                                               "match in a greedy generation vs in the reference, e.g. GSM8K's "
                                               "'#### (-?[\\d,\\.]+)' (the gsm8k task's default)")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                        help="causal LM prompt layout: chat (the tokenizer's chat template), plain "
                             "('### Instruction: ... ### Response:'), auto (chat when the tokenizer has a template)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt for exact match")


def _has_alpaca_fields(path: str) -> bool:
    """Whether the file at ``path`` looks like Alpaca data (its first bytes name instruction, input, output)."""
    file = Path(path)
    if not file.is_file():
        return False
    with file.open(encoding="utf-8-sig", errors="replace") as f:
        head = f.read(_SNIFF_BYTES)
    return all(f'"{name}"' in head for name in ALPACA_FIELDS)


def wants_generative(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for prompt/response (causal-lm or seq2seq) training."""
    if is_generative_task(getattr(args, "task", None)):
        return True
    if getattr(args, "prompt_col", None) or getattr(args, "response_col", None):
        return True
    return bool(args.data and not args.text_cols and not args.label_col and _has_alpaca_fields(args.data))


def generative_metrics(answer_regex: str | None) -> list[str]:
    """A generative run's metrics, the first one reported as *the* metric."""
    return ["exact_match", "loss", "perplexity"] if answer_regex else ["loss", "perplexity"]


def answer_regex_of(args: argparse.Namespace) -> str | None:
    """``--answer-regex``, else the registered task's own (GSM8K's), else None; checked to compile."""
    regex = getattr(args, "answer_regex", None)
    if regex is None and is_generative_task(getattr(args, "task", None)):
        regex = get_generative_task(args.task).answer_regex
    if regex is not None:
        compile_answer_regex(regex)
    return regex


def load_generative_data(args: argparse.Namespace) -> tuple[Examples, Examples, str]:
    """Train and eval examples of a generative run and a name for the data (task or file)."""
    kind = generative_kind(args.model)
    metrics = generative_metrics(answer_regex_of(args))
    if is_generative_task(getattr(args, "task", None)):
        train, evals, task = load_generative_task(args.task, kind, metrics)
        name = task.name
    else:
        if not args.data:
            raise DataError("--prompt-col/--response-col read --data FILE; give --data")
        header = not getattr(args, "no_header", False)
        train = load_generative_file(args.data, args.prompt_col, args.response_col, kind, header, metrics)
        if args.eval_data:
            evals = load_generative_file(args.eval_data, args.prompt_col, args.response_col, kind, header, metrics)
        else:
            train, evals = train.split(0.1, seed=args.seed)
        name = args.data
    return train.sample(args.train_limit, args.seed), evals.sample(args.eval_limit, args.seed), name


def generative_dataset(args: argparse.Namespace, examples: Examples, model: Any, tokenizer: Any,
                       prompt_format: str | None = None) -> GenerativeDataset:
    """``examples`` encoded for ``model`` under the run's options (prompt format, length, exact match)."""
    fmt = choose_format(tokenizer, examples.kind, prompt_format or getattr(args, "prompt_format", "auto"))
    settings = GenerationSettings(answer_regex_of(args), getattr(args, "max_new_tokens", 128),
                                  max(1, min(args.batch_size, 16)), progress=not getattr(args, "no_progress", False))
    return encode_generative(examples, tokenizer, args.max_length, fmt, context_length(model), settings)


def task_loaders(args: argparse.Namespace, train: Examples, evals: Examples, model: Any,
                 tokenizer: Any) -> tuple[DataLoader, DataLoader]:
    """(train loader, shuffled with ``args.seed``; eval loader) for any task kind."""
    from peftlab.train.data import make_loader  # noqa: PLC0415

    if not train.is_generative:
        return (make_loader(train, tokenizer, args.batch_size, args.max_length, shuffle=True, seed=args.seed),
                make_loader(evals, tokenizer, args.batch_size, args.max_length))
    return (make_generative_loader(generative_dataset(args, train, model, tokenizer), args.batch_size, True, args.seed),
            make_generative_loader(generative_dataset(args, evals, model, tokenizer), args.batch_size))


def task_report(examples: Examples, evals: Examples, loaders: tuple[Any, ...],
                after: dict[str, Any] | None) -> dict[str, Any]:
    """The report fields a task kind adds: the eval set's no-skill ``baseline`` and ``baseline_check``
    (classification, regression), or the prompt format, exact-match settings and per-split length
    counts (``lengths``: kept, truncated, dropped, limit) of a generative run."""
    if not examples.is_generative:
        baseline = constant_baseline(evals)
        return {"baseline": baseline,
                "baseline_check": baseline_check(examples.metrics[0], after, baseline, examples.label_names)}
    datasets = [getattr(loader, "dataset", None) for loader in loaders]
    first = datasets[-1]
    return {
        "prompt_format": first.prompt_format, "answer_regex": first.settings.answer_regex,
        "max_new_tokens": first.settings.max_new_tokens,
        "lengths": {split: d.length_report() for split, d in zip(("train", "eval")[-len(datasets):], datasets)},
    }



def add_file_arguments(parser: argparse.ArgumentParser) -> None:
    """``--no-header`` and ``--metrics``: how ``peftlab train`` / ``peftlab eval`` read a user's --data."""
    parser.add_argument("--no-header", action="store_true",
                        help="--data/--eval-data (CSV/TSV) have no header row: name columns by 0-based number, "
                             "e.g. GLUE's CoLA: --no-header --text-cols 3 --label-col 1")
    parser.add_argument("--metrics", help="comma-separated metrics for --data, the first one reported as the metric "
                                          "(accuracy, f1, mcc, pearson, spearman; default: accuracy (+ f1 when "
                                          "binary), pearson,spearman for regression)")


def metrics_of(args: argparse.Namespace) -> list[str] | None:
    """``--metrics`` as a list (None when not given); ValueError naming an unknown metric."""
    from peftlab.train.metrics import METRICS  # noqa: PLC0415

    text = getattr(args, "metrics", None)
    if not text:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise DataError(f"--metrics {text!r}: unknown metric {unknown[0] if unknown else '(none)'!r}; "
                        f"known: {', '.join(METRICS)}")
    return names
