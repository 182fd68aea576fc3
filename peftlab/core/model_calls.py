"""What a model-site delta needs to rewrite a Hugging Face transformers call.

Prefix-style methods (prefix tuning, P-tuning v2, and later prompt tuning or LLaMA-Adapter) add
key/value rows through the model's own cache, extend the attention mask and give explicit
positions. The pieces here are independent of any one method: reading the call (batch size, new
length, device, dtype), building caches (including a read-only layer that checkpointed layers may
re-run), letting checkpointed transformers layers keep such a cache for one call, and hooking
T5-style encoder self-attentions, whose encoder drops any cache it is given.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def injected_self_attention_cache(blocks: list[nn.Module], cache: Any, p: int) -> Iterator[None]:
    """While inside: each encoder self-attention gets ``past_key_values=cache`` (its layer holds P_k,
    P_v) and a mask with p visible columns prepended. The hooks are removed on exit."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        args = list(args)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None:
            visible = True if mask.dtype == torch.bool else 0.0
            mask = nn.functional.pad(mask, (p, 0), value=visible)
            if len(args) > 1:
                args[1] = mask
            else:
                kwargs["attention_mask"] = mask
        kwargs["past_key_values"] = cache
        return tuple(args), kwargs

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def encoder_self_attentions(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's self-attention sublayers that accept ``past_key_values`` (T5's layer[0])."""
    blocks = getattr(encoder, "block", None)
    if blocks is None or not all(hasattr(b, "layer") for b in blocks):
        raise NotImplementedError(
            f"an encoder prefix supports T5-style encoders, not {type(encoder).__name__}"
        )
    return [b.layer[0] for b in blocks]


def call_batch_size(kw: dict) -> int:
    """The batch size of a model call, read from whichever input it carries."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels"):
        if kw.get(key) is not None:
            return kw[key].shape[0]
    if kw.get("encoder_outputs") is not None:
        return kw["encoder_outputs"][0].shape[0]
    raise TypeError("the adapter needs input_ids or inputs_embeds (the model call had neither)")


def call_device(kw: dict) -> torch.device:
    """The device of a model call's inputs (CPU when it has none)."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "attention_mask"):
        if kw.get(key) is not None:
            return kw[key].device
    return torch.device("cpu")


def new_length(kw: dict, enc_dec: bool) -> int:
    """How many new (decoder) positions the call adds: the length of its ids or embeddings."""
    keys = ("decoder_input_ids", "decoder_inputs_embeds") if enc_dec else ("input_ids", "inputs_embeds")
    for key in keys:
        if kw.get(key) is not None:
            return kw[key].shape[1]
    if enc_dec and kw.get("labels") is not None:
        return kw["labels"].shape[1]
    if enc_dec:
        return 1  # generate starts the decoder with one token
    raise TypeError("the adapter needs input_ids or inputs_embeds (the model call had neither)")


def mask_key(enc_dec: bool) -> str:
    """The argument that holds the self-attention mask of the part that reads the prefix."""
    return "decoder_attention_mask" if enc_dec else "attention_mask"


def generate_expand_size(model: nn.Module, kw: dict) -> int:
    """How many rows ``generate`` makes of each input row: max(num_beams, num_return_sequences)."""
    gc = kw.get("generation_config") or getattr(model, "generation_config", None)
    beams = kw.get("num_beams") or getattr(gc, "num_beams", None) or 1
    seqs = kw.get("num_return_sequences") or getattr(gc, "num_return_sequences", None) or 1
    return max(beams, seqs)


def new_cache(readers: int = 0):
    """An empty DynamicCache (no per-layer types from the config, as PEFT builds it); with
    ``readers``, that many read-only prefix layers."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if readers:
        cache.layers = [reader_layer_class()() for _ in range(readers)]
    return cache


def store_in_cache(cache: Any, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Append prefix rows to one layer of the cache (a read-only layer too)."""
    if layer < len(cache.layers) and isinstance(cache.layers[layer], reader_layer_class()):
        from transformers.cache_utils import DynamicLayer

        DynamicLayer.update(cache.layers[layer], k, v)
    else:
        cache.update(k, v, layer)


@functools.cache
def reader_layer_class() -> type:
    """A ``DynamicLayer`` subclass whose ``update`` returns [P; new] and stores nothing."""
    from transformers.cache_utils import DynamicLayer

    class ReaderLayer(DynamicLayer):
        """Holds only the prefix: ``update`` returns [P; new] and stores nothing, so a checkpointed
        layer that runs again in backward sees exactly what it saw in forward."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return ReaderLayer


def is_checkpointing(model: nn.Module) -> bool:
    """Training with activation checkpointing on (transformers then drops caches it could write twice)."""
    return model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def allow_cache_in_checkpoints(model: nn.Module) -> None:
    """For the next call of ``model`` only: let its checkpointed layers keep our read-only cache
    (transformers' ``_can_checkpoint_with_cache``, meant for layers that only read the cache). Two
    one-shot hooks set the flag on the layers' instances and remove it after the call."""
    layers = [m for m in model.modules() if getattr(m, "_can_checkpoint_with_cache", None) is False]

    def before(module: nn.Module, args: tuple) -> None:
        for m in layers:
            m._can_checkpoint_with_cache = True
        handles[0].remove()

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        for m in layers:
            m.__dict__.pop("_can_checkpoint_with_cache", None)
        handles[1].remove()

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after, always_call=True)]


def model_dtype(model: nn.Module, ref: torch.Tensor) -> torch.dtype:
    """The dtype of the model's floating-point weights (``ref``'s if it has none)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else ref.dtype


def accepts_argument(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes an argument called ``name``."""
    return name in inspect.signature(model.forward).parameters
