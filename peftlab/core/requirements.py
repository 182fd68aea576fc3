"""Requirements that several methods share (what a method needs from a model; see
:class:`~peftlab.core.registry.Requirement`). A requirement specific to one method lives in that
method's file."""

from __future__ import annotations

from torch import nn

from peftlab.core.model_calls import accepts_inputs_embeds, has_cache_argument
from peftlab.core.registry import Requirement


def takes_kv_cache(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (it has a ``config``) that takes a key/value cache,
    under whichever name its transformers version uses (``model_calls.cache_argument``)."""
    return getattr(model, "config", None) is not None and has_cache_argument(model)


KV_CACHE_MODEL = Requirement(
    what="a transformers model whose forward takes a key/value cache (decoders, BERT-style encoders, T5)",
    met=takes_kv_cache,
    hint="Vision encoders such as ViT and plain nn.Modules have no key/value cache; use lora, ia3 or an adapter.",
)


def takes_token_embeddings(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (it has a ``config``) whose input embeddings are a
    token table (``get_input_embeddings()`` is an ``nn.Embedding``) and whose forward, or its
    backbone's, takes ``inputs_embeds``: decoders, BERT-style encoders, T5."""
    if getattr(model, "config", None) is None or not hasattr(model, "get_input_embeddings"):
        return False
    try:
        table = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return False
    return isinstance(table, nn.Embedding) and accepts_inputs_embeds(model)


INPUT_EMBEDDINGS_MODEL = Requirement(
    what="a transformers model that reads token embeddings (get_input_embeddings() an nn.Embedding, forward "
         "taking inputs_embeds: decoders, BERT-style encoders, T5)",
    met=takes_token_embeddings,
    hint="Vision encoders such as ViT embed patches, not tokens; use lora, ia3 or an adapter.",
)
