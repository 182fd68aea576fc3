"""Tokenising prompt/response examples for instruction tuning (``causal-lm``) and ``seq2seq``, with
the loss on the response tokens only, and counting (never hiding) what does not fit.

causal-lm: ``input_ids = prompt + response`` and ``labels = [-100] * len(prompt) + response``, so
the model's own shifted cross-entropy is taken over response tokens alone. seq2seq: ``input_ids``
is the prompt (the encoder's input) and ``labels`` the response (the decoder's target).

Length: every example is fitted to ``limit = min(max_length, the model's context)`` tokens. A causal
LM example whose prompt and response overrun it keeps its prompt and loses the tail of its response
(*truncated*); one whose prompt alone leaves no room for a response token is left out (*dropped*).
A seq2seq example is cut to ``limit`` on each side (truncated). The counts travel with the dataset
into the run's report; a file where every example is dropped is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from peftlab.train.batching import Collator, pad_rows
from peftlab.train.examples import DataError, Examples
from peftlab.train.prompts import PromptFormat, prompt_text, response_text

IGNORE_INDEX = -100


@dataclass(frozen=True)
class GenerationSettings:
    """How a generative eval set is scored beyond its loss: ``answer_regex`` (group 1, else the whole
    match, is the final answer; None: no exact match), ``max_new_tokens`` for greedy generation in
    batches of ``batch_size`` prompts, with a progress bar when ``progress``."""

    answer_regex: str | None = None
    max_new_tokens: int = 128
    batch_size: int = 16
    progress: bool = False


class GenerativeDataset(Dataset):
    """Encoded prompt/response examples, plus what evaluation and the report need: ``kind``,
    ``metrics``, ``prompt_ids`` (what generation continues), ``references`` (the response texts),
    the tokenizer (to decode generations), the :class:`GenerationSettings`, and the length counts
    ``truncated`` / ``dropped`` with the ``limit`` applied."""

    def __init__(self, features: list[dict[str, list[int]]], prompt_ids: list[list[int]], references: list[str],
                 kind: str, metrics: Sequence[str], tokenizer: Any, settings: GenerationSettings,
                 truncated: int, dropped: int, limit: int, prompt_format: PromptFormat) -> None:
        """Wrap the encoded examples (see the class docstring)."""
        self.features = features
        self.prompt_ids = prompt_ids
        self.references = references
        self.kind = kind
        self.metrics = list(metrics)
        self.tokenizer = tokenizer
        self.settings = settings
        self.truncated = truncated
        self.dropped = dropped
        self.limit = limit
        self.prompt_format = prompt_format
        self.label_names: list[str] = []

    def __len__(self) -> int:
        """Number of examples kept."""
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        """Example ``index``: ``input_ids``, ``attention_mask`` and ``labels`` (lists of ints)."""
        return self.features[index]

    def length_report(self) -> dict[str, int]:
        """The counts a report shows: examples kept, truncated, dropped, and the token limit."""
        return {"examples": len(self), "truncated": self.truncated, "dropped": self.dropped, "limit": self.limit}


def context_length(model: Any) -> int | None:
    """The longest sequence the model's positions allow (``max_position_embeddings`` or
    ``n_positions``), or None when it has no such limit (T5's relative positions)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def prompt_ids(tokenizer: Any, prompt: str, fmt: PromptFormat) -> list[int]:
    """The token ids a model reads before its answer: the formatted prompt (special tokens added by
    the tokenizer for the plain and seq2seq formats; a chat template writes its own)."""
    return _ids(tokenizer, prompt_text(tokenizer, prompt, fmt), fmt != "chat")


def encode_generative(examples: Examples, tokenizer: Any, max_length: int, fmt: PromptFormat,
                      context: int | None = None, settings: GenerationSettings | None = None) -> GenerativeDataset:
    """Tokenise generative :class:`Examples` (prompt in ``texts[i][0]``, response in ``labels[i]``)
    in prompt format ``fmt`` to at most ``min(max_length, context)`` tokens (see the module docstring).

    Raises :class:`DataError` when no example fits.
    """
    if not examples.is_generative:
        raise ValueError(f"encode_generative takes causal-lm or seq2seq examples, not {examples.kind}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    limit = min(max_length, context) if context else max_length
    features: list[dict[str, list[int]]] = []
    prompts: list[list[int]] = []
    references: list[str] = []
    truncated = dropped = 0
    for (prompt,), response in zip(examples.texts, examples.labels):
        if fmt == "seq2seq":
            source = prompt_ids(tokenizer, prompt, fmt)
            target = _with_eos(tokenizer, _ids(tokenizer, str(response), True))
            truncated += len(source) > limit or len(target) > limit
            source, target = source[:limit], target[:limit]
            features.append({"input_ids": source, "attention_mask": [1] * len(source), "labels": target})
        else:
            source = prompt_ids(tokenizer, prompt, fmt)
            target = _ids(tokenizer, response_text(tokenizer, prompt, str(response), fmt), False)
            room = limit - len(source)
            if room < 1:
                dropped += 1
                continue
            truncated += len(target) > room
            target = target[:room]
            ids = source + target
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                             "labels": [IGNORE_INDEX] * len(source) + target})
        prompts.append(source)
        references.append(str(response))
    if not features:
        raise DataError(f"{examples.source or 'the data'}: every one of the {len(examples)} prompts is longer than "
                        f"the {limit}-token limit (--max-length {max_length}"
                        + (f", model context {context}" if context else "") + "); nothing left to train on")
    metrics = ["exact_match", "loss", "perplexity"] if settings and settings.answer_regex else ["loss", "perplexity"]
    return GenerativeDataset(features, prompts, references, examples.kind, metrics, tokenizer,
                             settings or GenerationSettings(), truncated, dropped, limit, fmt)


class SequenceCollator:
    """Pads ``input_ids`` (pad id), ``attention_mask`` (0) and sequence ``labels`` (-100, ignored by
    the loss) to the batch's longest row. causal-lm labels line up with the inputs and are padded on
    the same side; seq2seq labels (the decoder's) are padded on the right to their own longest row."""

    def __init__(self, pad_token_id: int, padding_side: str, aligned_labels: bool) -> None:
        """Remember the pad id, the inputs' padding side and whether labels line up with inputs."""
        self.pad_token_id = pad_token_id
        self.left = padding_side == "left"
        self.aligned_labels = aligned_labels

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate one batch of :class:`GenerativeDataset` items."""
        if not batch:
            raise ValueError("cannot collate an empty batch")
        length = max(len(item["input_ids"]) for item in batch)
        labels = [list(i["labels"]) for i in batch]
        return {
            "input_ids": pad_rows([list(i["input_ids"]) for i in batch], self.pad_token_id, length, self.left),
            "attention_mask": pad_rows([list(i["attention_mask"]) for i in batch], 0, length, self.left),
            "labels": (pad_rows(labels, IGNORE_INDEX, length, self.left) if self.aligned_labels
                       else pad_rows(labels, IGNORE_INDEX, max(map(len, labels)), False)),
        }


def make_generative_loader(dataset: GenerativeDataset, batch_size: int = 8, shuffle: bool = False,
                           seed: int = 0) -> DataLoader:
    """A DataLoader of padded batches of ``dataset``; shuffling uses its own generator seeded with ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    plain = Collator.for_tokenizer(dataset.tokenizer)  # its pad id (else eos) and padding side
    collate = SequenceCollator(plain.pad_token_id, plain.padding_side, aligned_labels=dataset.kind == "causal-lm")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate)
