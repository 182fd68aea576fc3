"""Task names -> transformers Auto classes, and loading a Hugging Face model directory for a task."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .padding import ensure_padding
from .seeding import seeded

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Every task :func:`peftlab.zoo.load` understands, mapped to the Auto class it uses.
#: ``"base"`` means the bare encoder for an encoder and the language model for a decoder;
#: each zoo entry says which (see :func:`resolve_task`).
TASK_CLASSES: dict[str, str] = {
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
}
TASKS: tuple[str, ...] = tuple(TASK_CLASSES)

#: Seed for heads that from_pretrained initialises at random, so that two loads are identical.
HEAD_SEED = 0


def resolve_task(task: str, base_means: str = "base", allowed: tuple[str, ...] = TASKS) -> str:
    """Validate ``task`` and map ``"base"`` to ``base_means`` (e.g. ``"causal-lm"`` for a decoder).

    Args:
        task: the task asked for.
        base_means: the task ``"base"`` stands for with this model.
        allowed: the tasks this model supports.

    Raises:
        ValueError: ``task`` is not in ``allowed``.
    """
    if task not in allowed or task not in TASK_CLASSES:
        raise ValueError(f"unknown task {task!r} for this model; expected one of {', '.join(allowed)}")
    return base_means if task == "base" else task


def head_kwargs(task: str, num_labels: int | None) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments that shape the head for ``task``.

    ``classification`` defaults to 2 labels; ``regression`` is one output with
    ``problem_type="regression"`` (MSE loss).

    Raises:
        ValueError: ``num_labels`` given for a task without labels, or inconsistent with regression.
    """
    if task == "classification":
        labels = 2 if num_labels is None else num_labels
        if labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {labels}")
        return {"num_labels": labels}
    if task == "regression":
        if num_labels not in (None, 1):
            raise ValueError(f"task 'regression' predicts one value; num_labels must be 1 or None, got {num_labels}")
        return {"num_labels": 1, "problem_type": "regression"}
    if num_labels is not None:
        raise ValueError(f"num_labels only applies to 'classification' and 'regression', not to task {task!r}")
    return {}


def auto_class(task: str) -> Any:
    """The transformers Auto class for an already resolved task (imported lazily)."""
    import transformers

    return getattr(transformers, TASK_CLASSES[task])


def load_model_dir(
    path: str | Path,
    task: str,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Load the model in a local Hugging Face directory for a resolved ``task``, strictly offline.

    Weights the checkpoint lacks (a fresh classification head) are initialised under
    :func:`seeded` with :data:`HEAD_SEED`, so repeated loads give identical models and the
    caller's global RNG state is left untouched. The model is returned as ``from_pretrained``
    returns it: in eval mode, in ``dtype``.
    """
    cls = auto_class(task)
    with seeded(HEAD_SEED):
        return cls.from_pretrained(str(path), local_files_only=True, dtype=dtype, **head_kwargs(task, num_labels))


def load_tokenizer_dir(path: str | Path, model: PreTrainedModel | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer in a local directory offline, made able to pad (see :func:`ensure_padding`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    ensure_padding(tokenizer, model)
    return tokenizer
