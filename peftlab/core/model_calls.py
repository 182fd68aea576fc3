"""What a model-site delta needs to rewrite a Hugging Face transformers call.

Prefix-style methods (prefix tuning, P-tuning v2, and later prompt tuning or LLaMA-Adapter) add
key/value rows through the model's own cache, extend the attention mask and give explicit
positions. The pieces here are independent of any one method: reading the call (batch size, new
length, device, dtype), building caches (including a read-only layer that checkpointed layers may
re-run), letting checkpointed transformers layers keep such a cache for one call, and hooking
T5-style encoder self-attentions, whose encoder drops any cache it is given.

transformers versions differ (all handled here, read from the model, never from a version number):
the cache argument is ``cache`` in 5.24 and ``past_key_values`` in 4.57 (:func:`cache_argument`); a
head whose own ``forward`` lacks it (BertForSequenceClassification) must get it to its backbone
(:func:`pass_cache`); 4.57 drops the cache of every checkpointed layer without a switch
(:func:`allow_cache_in_checkpoints`) and its ``generate`` counts the prompt from ``cache_position``
and recomputes ``position_ids`` from the mask at each step (:func:`start_generation_after_cache`).
The cache classes the code uses (``DynamicCache()``, ``EncoderDecoderCache(self, cross)``,
``DynamicLayer()`` and its ``update(k, v)``, ``.layers``, ``.self_attention_cache``, ``.keys``,
``.values``, ``get_seq_length()``) behave the same in both.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn



#: The names transformers has used for the key/value cache argument of ``forward`` (5.24 renamed it).
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def has_cache_argument(model: nn.Module) -> bool:
    """Whether :func:`cache_argument` finds a cache argument (without raising)."""
    try:
        cache_argument(model)
    except TypeError:
        return False
    return True


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether activation checkpointing is on in any layer of ``model`` (transformers sets
    ``gradient_checkpointing`` on its layers in 4.57 and 5.x alike)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def enable_checkpointing(model: nn.Module, checkpointing_kwargs: dict[str, Any], **rest: Any) -> None:
    """Turn on a transformers model's activation checkpointing under its version's name
    (``activation_checkpointing_enable`` in 5.x, ``gradient_checkpointing_enable`` in 4.57)."""
    if "activation_checkpointing_enable" in dir(model):
        model.activation_checkpointing_enable(checkpointing_kwargs, **rest)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs, **rest)


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model`` takes its key/value cache, read from its own ``forward``
    signature: ``cache`` (transformers 5.24) or ``past_key_values`` (4.57). transformers uses the
    same name for the cache a forward returns (``output.cache`` / ``output.past_key_values``), for
    the keyword ``generate`` accepts and for what ``prepare_inputs_for_generation`` passes on, so
    this one name serves for all of them. Works on layers too (T5's self-attention sublayer).

    A head whose own ``forward`` has no such argument (BertForSequenceClassification) is read
    through its backbone (``base_model``); :func:`pass_cache` delivers the cache there.

    Raises:
        TypeError: naming the class, when neither the module nor its backbone takes a cache
            (ViTModel, a plain ``nn.Module``).
    """
    for module in dict.fromkeys((model, getattr(model, "base_model", model))):
        params = inspect.signature(module.forward).parameters
        for name in CACHE_ARGUMENT_NAMES:
            if name in params:
                return name
    raise TypeError(f"{type(model).__name__} takes no key/value cache: its forward has no argument named "
                    f"{' or '.join(CACHE_ARGUMENT_NAMES)}")


def pass_cache(model: nn.Module, kw: dict, cache: Any) -> str:
    """Put ``cache`` into the call's keyword arguments under the model's own name (returned).

    When the model's own ``forward`` does not name that argument (a head over a backbone that
    takes the cache: BertForSequenceClassification, with no ``**kwargs`` in 4.57), the next call of
    ``model`` hands it on: a pre-hook takes it out of the head's arguments, a pre-hook on
    ``base_model`` puts it back, and both are removed when that call ends (or fails)."""
    name = cache_argument(model)
    kw[name] = cache
    if name in inspect.signature(model.forward).parameters:
        return name
    backbone, held = model.base_model, []

    def take(module: nn.Module, args: tuple, kwargs: dict):
        handles[0].remove()
        if kwargs.get(name) is None:
            return None
        kwargs = dict(kwargs)
        held.append(kwargs.pop(name))
        return args, kwargs

    def give(module: nn.Module, args: tuple, kwargs: dict):
        if held and kwargs.get(name) is None:
            return args, {**kwargs, name: held[0]}
        return None

    def done(module: nn.Module, args: tuple, output: Any) -> None:
        handles[1].remove()
        handles[2].remove()

    handles = [model.register_forward_pre_hook(take, with_kwargs=True),
               backbone.register_forward_pre_hook(give, with_kwargs=True),
               model.register_forward_hook(done, always_call=True)]
    return name


@contextlib.contextmanager
def injected_self_attention_cache(blocks: list[nn.Module], cache: Any, p: int) -> Iterator[None]:
    """While inside: each encoder self-attention gets ``cache`` under its own argument name
    (:func:`cache_argument`; its layer holds P_k, P_v) and a mask with p visible columns prepended.
    The hooks are removed on exit."""
    names = {b: cache_argument(b) for b in blocks}

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
        kwargs[names[module]] = cache
        return tuple(args), kwargs

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def encoder_self_attentions(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's self-attention sublayers that take a cache argument (T5's layer[0])."""
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
    return model.training and torch.is_grad_enabled() and checkpointing_enabled(model)


def allow_cache_in_checkpoints(model: nn.Module, cache: Any) -> None:
    """For the next call of ``model`` only: let its checkpointed layers keep ``cache``, our read-only
    cache. Two one-shot hooks set this up on the layers' instances and undo it after the call.

    transformers 5.24 has a switch, ``_can_checkpoint_with_cache`` (meant for layers that only read
    the cache), set on the instances. 4.57 has none: a checkpointed layer's ``__call__`` always sets
    its cache argument to None before handing the call to ``_gradient_checkpointing_func``; that
    function is wrapped (on the instance) so the call it checkpoints gets ``cache`` back, both in
    forward and when backward runs the layer again."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    flagged = [m for m in model.modules() if getattr(m, "_can_checkpoint_with_cache", None) is False]
    wrapped = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
               and not hasattr(m, "_can_checkpoint_with_cache") and m.__dict__.get("_gradient_checkpointing_func")]

    def keeping_cache(checkpoint: Callable, name: str) -> Callable:
        def run(fn: Callable, *args: Any, **kwargs: Any) -> Any:
            return checkpoint(functools.partial(fn, **{name: cache}), *args, **kwargs)
        return run

    def before(module: nn.Module, args: tuple) -> None:
        for m in flagged:
            m._can_checkpoint_with_cache = True
        for m in wrapped:
            m._gradient_checkpointing_func = keeping_cache(m._gradient_checkpointing_func, cache_argument(m))
        handles[0].remove()

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        for m in flagged:
            m.__dict__.pop("_can_checkpoint_with_cache", None)
        for m, original in originals.items():
            m._gradient_checkpointing_func = original
        handles[1].remove()

    originals = {m: m._gradient_checkpointing_func for m in wrapped}

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after, always_call=True)]


def start_generation_after_cache(model: nn.Module, kw: dict, cache: Any, seen: int, new: int,
                                 positions: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
    """Let ``generate`` start from ``cache``, which already holds ``seen`` entries (a prefix) before
    the ``new`` prompt tokens of ``kw``; for a decoder-only model, ``positions(mask, new)`` gives the
    ``position_ids`` of a call's last ``new`` tokens from its whole 2-D attention mask. Returns the
    hook handle described below, or None.

    transformers 5.24 needs nothing: the mask is longer than the prompt, so it runs every prompt
    token, and it extends the given ``position_ids`` by one per step. 4.57's ``generate`` (its
    ``prepare_inputs_for_generation`` takes ``cache_position``) derives the tokens to run from
    ``cache_position``, by default counted from the cache length (the prompt would lose ``seen``
    tokens): it gets ``cache_position = seen … seen+new−1``; as 4.57 would pass that (and the cache)
    to an encoder too, an encoder-decoder's encoder is run here and generate gets ``encoder_outputs``.
    It also recomputes ``position_ids``
    from the mask at every step, so, with ``positions``, a pre-hook gives each forward call that
    carries ``cache`` and a ``cache_position`` (generate's calls) ``positions(mask, new)`` instead;
    the hook goes when the cache is freed (or by the handle)."""
    if "cache_position" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
        return None
    kw["cache_position"] = torch.arange(seen, seen + new, device=call_device(kw))
    if getattr(model.config, "is_encoder_decoder", False) and kw.get("encoder_outputs") is None:
        # 4.57's generate would hand the encoder cache_position (and the cache) too: run it here
        names = ("input_ids", "inputs_embeds", "attention_mask", "output_attentions", "output_hidden_states")
        with torch.no_grad():
            kw["encoder_outputs"] = model.get_encoder()(**{k: kw[k] for k in names if kw.get(k) is not None},
                                                        return_dict=True)
    if positions is None:
        return None
    kw.pop("position_ids", None)  # ours: 4.57 would slice these, never extended, at every step
    name, target = cache_argument(model), weakref.ref(cache)  # positions must not hold the cache either

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if kwargs.get(name) is None or kwargs[name] is not target() or kwargs.get("cache_position") is None:
            return None
        return args, {**kwargs, "position_ids": positions(kwargs["attention_mask"], new_length(kwargs, False))}

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    weakref.finalize(cache, handle.remove)
    return handle


def model_dtype(model: nn.Module, ref: torch.Tensor) -> torch.dtype:
    """The dtype of the model's floating-point weights (``ref``'s if it has none)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else ref.dtype


def accepts_argument(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes an argument called ``name``."""
    return name in inspect.signature(model.forward).parameters


def accepts_inputs_embeds(model: nn.Module) -> bool:
    """Whether ``model.forward``, or its backbone's (``base_model``), takes ``inputs_embeds``."""
    return any(accepts_argument(m, "inputs_embeds") for m in dict.fromkeys((model, getattr(model, "base_model", model))))
