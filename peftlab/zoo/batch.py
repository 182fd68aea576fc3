"""``tiny_batch``: a valid, padded, reproducible input dict for a (tiny) transformers model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .tiny import EOS_ID

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_IMAGE_TYPES = ("vit",)


def _padding_side(model: PreTrainedModel) -> str:
    """Left padding for decoder-only generators (as for generation), right padding otherwise."""
    config = model.config
    decoder_only = model.can_generate() and not getattr(config, "is_encoder_decoder", False)
    return "left" if decoder_only else "right"


def tiny_batch(model: PreTrainedModel, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A reproducible input dict that ``model(**tiny_batch(model))`` accepts.

    * text models: ``input_ids`` (``batch x seq``, random ids above the special tokens) and
      ``attention_mask``; the last row is padded with ``pad_token_id`` over its last (right
      padding: encoders, encoder-decoders) or first (left padding: decoder-only models)
      ``max(1, seq // 4)`` positions;
    * encoder-decoders (T5) also get ``decoder_input_ids`` (``batch x max(1, seq // 2)``,
      starting with ``decoder_start_token_id``);
    * image models (ViT) get ``pixel_values`` (``batch x channels x size x size``) only.

    No ``labels`` are included. Works for the real zoo models too (ids are drawn below the
    config's ``vocab_size``). The global RNG is not touched; ``seed`` fixes the content.
    """
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    if config.model_type in _IMAGE_TYPES:
        size, channels = config.image_size, config.num_channels
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=generator)}

    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    low = min(EOS_ID + 1, config.vocab_size - 1)
    input_ids = torch.randint(low, config.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    n_pad = max(1, seq // 4) if seq > 1 else 0
    if n_pad:
        cols = slice(seq - n_pad, seq) if _padding_side(model) == "right" else slice(0, n_pad)
        input_ids[-1, cols] = pad_id
        attention_mask[-1, cols] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if getattr(config, "is_encoder_decoder", False):
        dec_len = max(1, seq // 2)
        decoder_ids = torch.randint(low, config.vocab_size, (batch, dec_len), generator=generator)
        decoder_ids[:, 0] = config.decoder_start_token_id
        inputs["decoder_input_ids"] = decoder_ids
    return inputs
