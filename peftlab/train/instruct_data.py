"""Prompt/response data for instruction tuning and seq2seq: the registered generative tasks (Alpaca,
GSM8K), a user's own file with ``--prompt-col`` / ``--response-col`` (or Alpaca's own fields), and
which kind of training a model calls for.

The examples are :class:`~peftlab.train.examples.Examples` of kind ``causal-lm`` or ``seq2seq``:
``texts[i] == (prompt,)`` and ``labels[i]`` is the response text. An Alpaca record's prompt is its
``instruction``, followed by a blank line and its ``input`` when that is not empty.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.train.answers import GSM8K_ANSWER_REGEX
from peftlab.train.data import find_data_dir, where_looked
from peftlab.train.examples import DataError, Examples
from peftlab.train.files import describe_columns, read_rows

#: Alpaca's fields: the instruction, an optional input, the response.
ALPACA_FIELDS = ("instruction", "input", "output")
#: Examples held out of a single-file task (Alpaca) as its eval split, always chosen with this seed
#: so that every run, whatever its --seed, is scored on the same examples.
HELD_OUT, HELD_OUT_SEED = 1000, 0


@dataclass(frozen=True)
class GenerativeTask:
    """A registered prompt/response task: its folder and files under the data directory (``eval_file``
    None: :data:`HELD_OUT` examples of the train file are the eval split), its columns (Alpaca
    layout when ``prompt_col`` is None) and the final-answer regex its exact match uses, if any."""

    name: str
    train_file: str
    eval_file: str | None
    prompt_col: str | None
    response_col: str | None
    answer_regex: str | None = None
    note: str = ""


GENERATIVE_TASKS: dict[str, GenerativeTask] = {
    task.name: task
    for task in (
        GenerativeTask("alpaca", "alpaca_data.json", None, None, None,
                       note="Stanford Alpaca, 52,002 instructions; 1,000 held out for evaluation"),
        GenerativeTask("gsm8k", "train.jsonl", "test.jsonl", "question", "answer", GSM8K_ANSWER_REGEX,
                       note="grade-school math (OpenAI's train.jsonl / test.jsonl); exact match of '#### N'"),
    )
}


def is_generative_task(name: str | None) -> bool:
    """Whether ``name`` is a registered prompt/response task (case and '-' ignored)."""
    return name is not None and _key(name) in GENERATIVE_TASKS


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_generative_task(name: str) -> GenerativeTask:
    """The registered prompt/response task ``name`` (case, '-' and '_' ignored); KeyError if none."""
    return GENERATIVE_TASKS[_key(name)]


def alpaca_prompt(instruction: str, context: str) -> str:
    """Alpaca's prompt: the instruction, then a blank line and the input when there is one."""
    return f"{instruction.strip()}\n\n{context.strip()}" if context and context.strip() else instruction.strip()


def _field(where: str, row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        raise DataError(f"{where}: {name!r} is missing (null)")
    return str(value)


def load_generative_file(path: str | os.PathLike[str], prompt_col: str | None = None,
                         response_col: str | None = None, kind: str = "causal-lm", header: bool = True,
                         metrics: list[str] | None = None) -> Examples:
    """A user's prompt/response file (CSV, TSV, JSONL or JSON) as generative :class:`Examples`.

    With neither column given, the file must have Alpaca's fields (instruction, input, output).
    Raises :class:`DataError` naming a missing column and listing those the file has.
    """
    file = Path(path)
    columns, rows = read_rows(file, header=header)
    alpaca = prompt_col is None and response_col is None
    if alpaca and not all(c in columns for c in ALPACA_FIELDS):
        raise DataError(f"{file}: give --prompt-col and --response-col (or use Alpaca's fields "
                        f"{', '.join(ALPACA_FIELDS)}); {describe_columns(columns, rows)}")
    if not alpaca and (prompt_col is None or response_col is None):
        raise DataError("--prompt-col and --response-col go together: give both")
    for name in ALPACA_FIELDS if alpaca else (prompt_col, response_col):
        if name not in columns:
            raise DataError(f"{file}: no column {name!r}; {describe_columns(columns, rows)}")
    texts, labels = [], []
    for where, row in rows:
        if alpaca:
            prompt = alpaca_prompt(_field(where, row, "instruction"), str(row.get("input") or ""))
            response = _field(where, row, "output")
        else:
            prompt, response = _field(where, row, str(prompt_col)), _field(where, row, str(response_col))
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty")
        texts.append((prompt,))
        labels.append(response)
    return Examples(texts=texts, labels=labels, label_names=[], kind=kind,  # type: ignore[arg-type]
                    metrics=metrics or ["loss", "perplexity"], task=None, source=str(file))


def load_generative_task(name: str, kind: str = "causal-lm", metrics: list[str] | None = None
                         ) -> tuple[Examples, Examples, GenerativeTask]:
    """(train, eval, task) of registered task ``name``, read from the data directory (see
    :func:`~peftlab.train.data.find_data_dir`). Raises :class:`DataError` saying where it looked."""
    task = get_generative_task(name)
    data_dir = find_data_dir()
    folder = data_dir / task.name if data_dir is not None else None
    files = [task.train_file] + ([task.eval_file] if task.eval_file else [])
    if folder is None or not all((folder / f).is_file() for f in files):
        columns = (f"--prompt-col {task.prompt_col} --response-col {task.response_col}"
                   if task.prompt_col else "(Alpaca fields)")
        raise DataError(f"task {task.name!r}: no local {task.name}/{' and '.join(files)} (looked in {where_looked()}); "
                        f"set $PEFTLAB_DATA to a folder holding {task.name}/, or give --data FILE {columns}")

    def read(file: str) -> Examples:
        examples = load_generative_file(folder / file, task.prompt_col, task.response_col, kind, metrics=metrics)
        examples.task = task.name
        return examples

    train = read(task.train_file)
    if task.eval_file:
        return train, read(task.eval_file), task
    rest, held = train.split(min(HELD_OUT, len(train) - 1) / len(train), seed=HELD_OUT_SEED)
    return rest, held, task


def generative_kind(model: str) -> str:
    """``causal-lm`` or ``seq2seq``: the training a prompt/response task means for ``model`` (a zoo
    name or a Hugging Face directory: ``is_encoder_decoder`` in its config.json means seq2seq).
    Raises :class:`DataError` for an encoder-only zoo model."""
    if model == "minilm":
        raise DataError("minilm is an encoder (BERT) and cannot generate: prompt/response training needs a "
                        "causal LM (--model smollm2, or a Llama/GPT-2 directory) or a T5-style directory")
    config = Path(model) / "config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text()).get("is_encoder_decoder"):
                return "seq2seq"
        except json.JSONDecodeError as err:
            raise DataError(f"{config} is not valid JSON ({err.msg})") from err
    return "causal-lm"
