"""Joint batches of a multi-adapter run: one micro-batch of each adapter's own data (each padded to
its own longest row by its loader), cut into forward passes of at most ``max_rows`` rows, each pass
re-padded to its longest part and stacked, with the adapter of every row.

Padding goes on the tokenizer's side with its pad id (masks and token types with 0), so a row's real
tokens keep their positions and the attention mask hides the extra pads: each row gives what it
gives in its own, shorter batch (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional

from peftlab.train.batching import MODEL_KEYS

Batch = dict[str, torch.Tensor]


@dataclass
class Part:
    """Rows ``[start, start + rows)`` of one forward pass belong to lane ``lane``; ``batch`` holds
    them (model inputs and ``labels``), ``of`` is the size of the lane's whole micro-batch (the
    denominator of its mean loss)."""

    lane: int
    batch: Batch
    start: int
    rows: int
    of: int


def _rows(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


def _slice(batch: Batch, begin: int, end: int) -> Batch:
    return {k: v[begin:end] for k, v in batch.items()}


def split_passes(micro: Sequence[tuple[int, Batch]], max_rows: int | None) -> list[list[Part]]:
    """The forward passes of one joint micro-step: ``micro`` holds ``(lane, micro-batch)`` pairs in
    order; their rows are taken in that order, at most ``max_rows`` per pass (None: one pass), a
    lane's micro-batch split across passes where it must."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    passes: list[list[Part]] = [[]]
    used = 0
    for lane, batch in micro:
        total = _rows(batch)
        taken = 0
        while taken < total:
            room = total - taken if max_rows is None else min(total - taken, max_rows - used)
            if room == 0:
                passes.append([])
                used = 0
                continue
            passes[-1].append(Part(lane, _slice(batch, taken, taken + room), used, room, total))
            taken += room
            used += room
    return [p for p in passes if p]


def _pad_columns(t: torch.Tensor, length: int, value: int, left: bool) -> torch.Tensor:
    extra = length - t.shape[1]
    if extra == 0:
        return t
    return functional.pad(t, (extra, 0) if left else (0, extra), value=value)


def join_inputs(parts: Sequence[Part], pad_token_id: int, padding_side: str) -> Batch:
    """The model inputs of one forward pass: every part's ``input_ids``, ``attention_mask`` and
    ``token_type_ids`` padded to the longest part (``input_ids`` with ``pad_token_id``, the others
    with 0) on ``padding_side`` and stacked in order. The parts must carry the same input keys."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    keys = [k for k in MODEL_KEYS if k in parts[0].batch]
    for part in parts[1:]:
        theirs = [k for k in MODEL_KEYS if k in part.batch]
        if theirs != keys:
            raise ValueError(f"the adapters' batches carry different inputs ({', '.join(keys)} against "
                             f"{', '.join(theirs)}); a joint batch needs one tokenizer for every adapter")
    length = max(int(p.batch["input_ids"].shape[1]) for p in parts)
    left = padding_side == "left"
    return {k: torch.cat([_pad_columns(p.batch[k], length, pad_token_id if k == "input_ids" else 0, left)
                          for p in parts]) for k in keys}
