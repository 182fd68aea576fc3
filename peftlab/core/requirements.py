"""Requirements that several methods share (what a method needs from a model; see
:class:`~peftlab.core.registry.Requirement`). A requirement specific to one method lives in that
method's file."""

from __future__ import annotations

import inspect

from torch import nn

from peftlab.core.registry import Requirement

#: The names transformers has used for the key/value cache argument of ``forward`` (5.24 renamed it).
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def takes_kv_cache(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (it has a ``config``) whose backbone's ``forward``
    takes a key/value cache argument, under whichever name its transformers version uses."""
    if getattr(model, "config", None) is None:
        return False
    backbone = getattr(model, "base_model", model)
    params = inspect.signature(backbone.forward).parameters
    return any(name in params for name in CACHE_ARGUMENT_NAMES)


KV_CACHE_MODEL = Requirement(
    what="a transformers model whose forward takes a key/value cache (decoders, BERT-style encoders, T5)",
    met=takes_kv_cache,
    hint="Vision encoders such as ViT and plain nn.Modules have no key/value cache; use lora, ia3 or an adapter.",
)
