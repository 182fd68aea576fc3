"""Joint batches of a multi-adapter run: one micro-batch of each adapter's own data (each padded to
its own longest row by its loader), run as one forward pass, or cut into passes of at most
``max_rows`` rows; a pass stacks its parts re-padded to the pass's longest row, with the adapter of
every row.

With ``max_rows``, the rows of every adapter are first ordered by length, so that short rows share
passes with short rows whatever their adapter and a pass pads little: one pass over tasks of very
different lengths (SST-2 sentences and RTE pairs) pads every row to the longest one.

Padding goes on the tokenizer's side with its pad id (masks and token types with 0), and columns that
hold only padding are cut, so a row's real tokens keep their positions and the attention mask hides
the pads: each row gives what it gives in its own batch (up to float rounding).
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


def row_lengths(batch: Batch) -> torch.Tensor:
    """Real tokens per row: the attention mask's sum, else the full width."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum(dim=1)
    return torch.full((_rows(batch),), batch["input_ids"].shape[1], dtype=torch.long)


def _pick(batch: Batch, index: list[int]) -> Batch:
    rows = torch.tensor(index, dtype=torch.long, device=batch["input_ids"].device)
    return {k: v.index_select(0, rows) for k, v in batch.items()}


def split_passes(micro: Sequence[tuple[int, Batch]], max_rows: int | None) -> list[list[Part]]:
    """The forward passes of one joint micro-step; ``micro`` holds ``(lane, micro-batch)`` pairs.

    ``max_rows`` None: one pass, every micro-batch whole, in order. Otherwise the rows of every lane
    are ordered by length (longest first; ties in lane and row order) and cut into passes of at most
    ``max_rows`` rows; within a pass the rows are grouped by lane, in lane order."""
    if max_rows is None:
        parts, start = [], 0
        for lane, batch in micro:
            parts.append(Part(lane, batch, start, _rows(batch), _rows(batch)))
            start += _rows(batch)
        return [parts]
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    order = sorted(((-int(n), k, i) for k, (_, batch) in enumerate(micro) for i, n in enumerate(row_lengths(batch))))
    passes = []
    for first in range(0, len(order), max_rows):
        chosen = order[first:first + max_rows]
        parts, start = [], 0
        for k, (lane, batch) in enumerate(micro):
            index = sorted(i for _, kk, i in chosen if kk == k)
            if index:
                parts.append(Part(lane, _pick(batch, index), start, len(index), _rows(batch)))
                start += len(index)
        passes.append(parts)
    return passes


def _fit_columns(t: torch.Tensor, length: int, value: int, left: bool) -> torch.Tensor:
    """``t`` with ``length`` columns: padded with ``value``, or with its extra (padding) columns cut,
    on the left or the right."""
    extra = length - t.shape[1]
    if extra == 0:
        return t
    if extra < 0:
        return t[:, -length:] if left else t[:, :length]
    return functional.pad(t, (extra, 0) if left else (0, extra), value=value)


def join_inputs(parts: Sequence[Part], pad_token_id: int, padding_side: str) -> Batch:
    """The model inputs of one forward pass: every part's ``input_ids``, ``attention_mask`` and
    ``token_type_ids`` fitted to the pass's longest row (padded with ``pad_token_id`` / 0, or cut
    where a column holds only padding) on ``padding_side`` and stacked in order. The parts must
    carry the same input keys."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    keys = [k for k in MODEL_KEYS if k in parts[0].batch]
    for part in parts[1:]:
        theirs = [k for k in MODEL_KEYS if k in part.batch]
        if theirs != keys:
            raise ValueError(f"the adapters' batches carry different inputs ({', '.join(keys)} against "
                             f"{', '.join(theirs)}); a joint batch needs one tokenizer for every adapter")
    length = max(int(row_lengths(p.batch).max()) for p in parts)
    left = padding_side == "left"
    return {k: torch.cat([_fit_columns(p.batch[k], length, pad_token_id if k == "input_ids" else 0, left)
                          for p in parts]) for k in keys}
