"""``load``: one entry point for the zoo's real models and for any local Hugging Face directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .info import ZooInfo, tag
from .minilm import load_minilm
from .smollm2 import load_smollm2
from .tasks import TASKS, load_model_dir, load_tokenizer_dir, resolve_task

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Loader = Callable[[str, "int | None", torch.dtype], "tuple[PreTrainedModel, PreTrainedTokenizerBase]"]

_LOADERS: dict[str, Loader] = {
    "minilm": load_minilm,
    "smollm2": load_smollm2,
}

#: The real pretrained models :func:`load` knows by name.
ZOO_NAMES: tuple[str, ...] = tuple(_LOADERS)


def load_directory(
    path: str | os.PathLike[str],
    task: str = "base",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local Hugging Face model directory (config, weights, tokenizer files) offline.

    Tasks: ``base`` (AutoModel), ``causal-lm``, ``classification``, ``regression``, ``seq2seq``.
    """
    resolved = resolve_task(task, base_means="base", allowed=TASKS)
    model = load_model_dir(path, resolved, num_labels, dtype)
    tokenizer = load_tokenizer_dir(path, model)
    tag(model, ZooInfo(name="directory", task=resolved, path=str(Path(path).resolve())))
    return model, tokenizer


def load(
    name_or_path: str | os.PathLike[str],
    task: str = "base",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a pretrained model and its tokenizer, strictly offline.

    Args:
        name_or_path: a zoo name (``"minilm"``: all-MiniLM-L6-v2, a BERT sentence encoder;
            ``"smollm2"``: SmolLM2-135M-Instruct, a Llama chat model) or the path of a local
            Hugging Face model directory. Zoo names take precedence; write ``./minilm`` for a
            directory of that name.
        task: ``"base"`` (the bare encoder for minilm and directories, the causal LM for
            smollm2), ``"causal-lm"``, ``"classification"`` (``num_labels`` outputs, default 2),
            ``"regression"`` (one output, MSE loss) or, for directories, ``"seq2seq"``.
        num_labels: number of classes for ``"classification"``.
        dtype: parameter dtype (float32 by default).

    Returns:
        ``(model, tokenizer)``. The model is as ``from_pretrained`` returns it (eval mode);
        a randomly initialised head is seeded, so two loads give identical models; the
        tokenizer always has a pad token. ``model.peftlab_zoo`` records the provenance.

    Raises:
        ValueError: unknown name (and not a directory), or a task the model does not support.
        ImportError: the package shipping a zoo model is missing; the message has the pip command.
    """
    key = os.fspath(name_or_path)
    if key in _LOADERS:
        return _LOADERS[key](task, num_labels, dtype)
    if Path(key).is_dir():
        return load_directory(key, task, num_labels, dtype)
    raise ValueError(
        f"unknown model {key!r}: expected one of the zoo names {', '.join(ZOO_NAMES)} "
        "or the path of an existing Hugging Face model directory"
    )
