"""Making a tokenizer able to pad batches for its model."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Tokenizers without a recorded limit report this sentinel (int(1e30)).
_UNSET_MAX_LENGTH = 10**12


def ensure_padding(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give ``tokenizer`` a pad token and ``model.config`` a matching ``pad_token_id``, in place.

    * a tokenizer without a pad token pads with its eos token (then unk);
    * a model config without ``pad_token_id`` gets the tokenizer's (sequence-classification heads
      need it to find the last real token of each row);
    * a tokenizer with no recorded ``model_max_length`` gets the model's
      ``max_position_embeddings`` so that ``truncation=True`` means something.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has neither a pad, an eos nor an unk token to pad with")
        tokenizer.pad_token = fallback
    if model is None:
        return
    config = model.config
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and (tokenizer.model_max_length is None or tokenizer.model_max_length >= _UNSET_MAX_LENGTH):
        tokenizer.model_max_length = int(max_positions)
