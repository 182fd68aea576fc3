"""Tokenising :class:`Examples` once, and padding each batch only to its own longest sequence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from peftlab.train.examples import Examples, Label

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class EncodedDataset(Dataset):
    """Token ids of each example (unpadded) with its label, plus the task facts a trainer needs
    (``kind``, ``metrics``, ``label_names``)."""

    def __init__(self, features: list[dict[str, list[int]]], labels: Sequence[Label],
                 kind: str, metrics: Sequence[str], label_names: Sequence[str]) -> None:
        """Wrap per-example features (lists of ints keyed by model input name) and labels."""
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} features but {len(labels)} labels")
        self.features = features
        self.labels = list(labels)
        self.kind = kind
        self.metrics = list(metrics)
        self.label_names = list(label_names)

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Example ``index`` as {input name: list of ints, "labels": label}."""
        return {**self.features[index], "labels": self.labels[index]}

    def num_tokens(self) -> int:
        """Total number of (unpadded) tokens."""
        return sum(len(f["input_ids"]) for f in self.features)


def encode(examples: Examples, tokenizer: Any, max_length: int = 128,
           chunk_size: int = 2048) -> EncodedDataset:
    """Tokenise every example (pairs as pairs), truncated to ``max_length`` tokens, unpadded.

    Keeps ``input_ids``, ``attention_mask`` and ``token_type_ids`` when the tokenizer gives them.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    features: list[dict[str, list[int]]] = []
    pair = examples.is_pair
    for start in range(0, len(examples), chunk_size):
        chunk = examples.texts[start:start + chunk_size]
        first = [t[0] for t in chunk]
        second = [t[1] for t in chunk] if pair else None
        out = tokenizer(first, second, truncation=True, max_length=max_length, padding=False)
        keys = [k for k in MODEL_KEYS if k in out]
        for i in range(len(chunk)):
            features.append({k: list(out[k][i]) for k in keys})
    return EncodedDataset(features, examples.labels, examples.kind, examples.metrics,
                          examples.label_names)


def pad_rows(rows: list[list[int]], value: int, length: int, left: bool) -> torch.Tensor:
    """``rows`` of ids as one ``(len(rows), length)`` long tensor, filled with ``value`` on the
    left (``left=True``) or the right."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        if left:
            out[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        else:
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int = 0, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Stack a list of examples into padded tensors.

    Sequences are padded to the longest one in this batch (rounded up to ``pad_to_multiple_of``):
    ``input_ids`` with ``pad_token_id``, masks and token types with 0. Labels become ``long``
    unless some label is a float (regression), then ``float32``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    length = max(len(item["input_ids"]) for item in batch)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    left = padding_side == "left"
    out: dict[str, torch.Tensor] = {}
    for key in MODEL_KEYS:
        if key in batch[0]:
            value = pad_token_id if key == "input_ids" else 0
            out[key] = pad_rows([list(item[key]) for item in batch], value, length, left)
    if "labels" in batch[0]:
        labels = [item["labels"] for item in batch]
        is_float = any(isinstance(x, float) for x in labels)
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if is_float else torch.long)
    return out


class Collator:
    """A picklable ``collate_fn`` bound to a pad id and padding side (see :func:`collate`)."""

    def __init__(self, pad_token_id: int = 0, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None) -> None:
        """Remember the padding settings."""
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate one batch."""
        return collate(batch, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> Collator:
        """A collator using the tokenizer's pad id (else its EOS id, else 0) and padding side."""
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        side = getattr(tokenizer, "padding_side", "right") or "right"
        return cls(int(pad) if pad is not None else 0, side, pad_to_multiple_of)


def make_loader(data: Examples | EncodedDataset, tokenizer: Any, batch_size: int = 32,
                max_length: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader of dynamically padded batches; encodes ``data`` first if it is
    :class:`Examples`. Shuffling uses its own generator seeded with ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = encode(data, tokenizer, max_length) if isinstance(data, Examples) else data
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=Collator.for_tokenizer(tokenizer))
