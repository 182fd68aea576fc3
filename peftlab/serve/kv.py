"""A padded, batched key/value cache with per-row lengths: one row per running request.

Row ``b`` holds its request's keys and values in columns ``0 .. length[b]-1`` of every layer's
``(rows, heads, columns, head_dim)`` buffer. A decode step writes each row's new key at its own
column ``length[b]`` (one scatter per layer) and attends over the first ``max(length) + 1`` columns
with a mask that hides each row's columns beyond its own length; rows are independent, so a request
joins or leaves the batch without touching the others. Running rows stay packed at the top
(:meth:`SlotCache.move_rows` fills a finished row's place with a later row), so a decode step reads
one contiguous block. Buffers grow by doubling and are freed when the engine goes idle.

The object is passed to a Hugging Face model as its cache (under :func:`~peftlab.core.model_calls.cache_argument`'s
name); the model calls ``update(key, value, layer_idx, ...)`` in every attention layer, which is the
same in transformers 4.57 and 5.x. Masks are given to the model as 4-D float masks, which both
versions use as they are. Rows with a gated prefix (UniPELT) get their prefix columns scaled by
their own gates in what a call's attention reads (:class:`~peftlab.serve.virtual.CallGates`); the
buffers keep the ungated prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .fused import FusedStep
    from .virtual import CallGates


class SlotCache:
    """Per-layer key/value buffers of shape (rows, heads, columns, head_dim); see the module docstring.

    Before each model call the engine says which rows the call covers and where they write:
    :meth:`begin_prefill` (fresh rows ``start .. start+g-1``, ``T`` new tokens each, written at
    columns ``0 .. T-1``) or :meth:`begin_decode` (rows ``0 .. n-1``, one token each, written at
    column ``lengths[b]``).
    """

    def __init__(self, device: torch.device | str, min_rows: int = 4, min_columns: int = 64):
        self.device = torch.device(device)
        self.min_rows, self.min_columns = min_rows, min_columns
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.rows = 0  # allocated rows
        self.columns = 0  # allocated columns
        self.peak_columns = 0  # the most columns ever allocated
        self._call: tuple[Any, ...] | None = None
        self._gates: CallGates | None = None

    # -- what the engine does between calls ----------------------------------------------------------
    def reserve(self, rows: int, columns: int) -> None:
        """Make room for ``rows`` rows and ``columns`` columns (doubling; existing entries kept)."""
        new_rows = self.rows
        while new_rows < rows:
            new_rows = max(self.min_rows, 2 * new_rows)
        new_cols = self.columns
        while new_cols < columns:
            new_cols = max(self.min_columns, 2 * new_cols)
        if (new_rows, new_cols) == (self.rows, self.columns):
            return
        for store in (self.keys, self.values):
            for layer, old in store.items():
                grown = old.new_zeros(new_rows, old.shape[1], new_cols, old.shape[3])
                grown[: self.rows, :, : self.columns] = old
                store[layer] = grown
        self.rows, self.columns = new_rows, new_cols
        self.peak_columns = max(self.peak_columns, new_cols)

    def move_rows(self, src: list[int], dst: list[int]) -> None:
        """Copy rows ``src`` onto rows ``dst`` in every layer (packing running rows after some finished)."""
        if not src:
            return
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for store in (self.keys, self.values):
            for buf in store.values():
                buf.index_copy_(0, d, buf.index_select(0, s))

    def clear(self) -> None:
        """Free every buffer (the engine is idle)."""
        self.keys.clear()
        self.values.clear()
        self.rows = self.columns = 0

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for s in (self.keys, self.values) for t in s.values())

    def begin_prefill(self, start: int, count: int, tokens: int,
                      prefixes: list[list[tuple[torch.Tensor, torch.Tensor]] | None] | None = None,
                      gates: "CallGates | None" = None) -> None:
        """The next call writes ``tokens`` new keys into fresh rows ``start .. start+count-1``, at
        columns ``0 .. tokens-1``; with ``prefixes`` (per row: per layer (P_k, P_v), each (heads, p,
        head_dim), or None), row b's prefix fills its columns ``0 .. p_b-1`` and its tokens follow,
        and the call attends over the prefixes too, gated by ``gates`` (rows of this call)."""
        self._gates = gates
        starts = [0 if kv is None else int(kv[0][0].shape[1]) for kv in (prefixes or [None] * count)]
        self.reserve(start + count, max(starts) + tokens)
        if not any(starts):
            self._call = ("prefill", start, count, tokens)
            return
        rows = torch.arange(start, start + count, device=self.device).view(count, 1)
        cols = torch.tensor(starts, device=self.device).view(count, 1) + torch.arange(tokens, device=self.device)
        self._call = ("prefixed", start, count, max(starts) + tokens, rows, cols, prefixes)

    def begin_decode(self, count: int, lengths: torch.Tensor, columns: int, gates: "CallGates | None" = None) -> None:
        """The next call writes one key per row ``b < count`` at column ``lengths[b]`` and attends
        over the first ``columns`` columns, the gated prefix columns scaled by ``gates``."""
        self._gates = gates
        self.reserve(count, columns)
        rows = torch.arange(count, device=self.device)
        self._call = ("decode", rows, lengths, columns)

    def begin_fused(self, step: "FusedStep") -> None:
        """The next call is a fused step (:mod:`~peftlab.serve.fused`): its packed tokens are written
        at (``step.token_rows``, ``step.token_columns``); the step's attention reads the buffers."""
        self._gates = None
        self.reserve(step.n + step.g, max(step.long_columns, step.width))  # the longest row writes at max(len)
        self._call = ("fused", step)

    def end(self) -> None:
        """The call is over."""
        self._call = None
        self._gates = None

    # -- what the model calls ------------------------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Store the call's new keys and values of layer ``layer_idx``; return what it attends over."""
        if self._call is None:
            raise RuntimeError("SlotCache.update outside an engine call (begin_prefill / begin_decode first)")
        if layer_idx not in self.keys:
            shape = (self.rows, key.shape[1], self.columns, key.shape[3])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(shape)
        kbuf, vbuf = self.keys[layer_idx], self.values[layer_idx]
        if self._call[0] == "fused":
            step = self._call[1]  # key: (1, heads, S, head_dim), token k at (token_rows[k], token_columns[k])
            kbuf[step.token_rows, :, step.token_columns] = key[0].transpose(0, 1)
            vbuf[step.token_rows, :, step.token_columns] = value[0].transpose(0, 1)
            return key, value
        if self._call[0] == "prefill":
            _, start, count, tokens = self._call
            kbuf[start : start + count, :, :tokens] = key
            vbuf[start : start + count, :, :tokens] = value
            return key, value  # fresh rows: the prompt attends over itself only
        if self._call[0] == "prefixed":
            _, start, count, columns, rows, cols, prefixes = self._call
            for b, kv in enumerate(prefixes):
                if kv is not None:
                    pk, pv = kv[layer_idx]
                    kbuf[start + b, :, : pk.shape[1]] = pk
                    vbuf[start + b, :, : pv.shape[1]] = pv
            kbuf[rows, :, cols] = key.transpose(1, 2)  # (count, tokens, heads, head_dim) at per-row columns
            vbuf[rows, :, cols] = value.transpose(1, 2)
            return self._gated(layer_idx, kbuf[start : start + count, :, :columns],
                               vbuf[start : start + count, :, :columns], value)
        _, rows, lengths, columns = self._call
        kbuf[rows, :, lengths] = key[:, :, 0]
        vbuf[rows, :, lengths] = value[:, :, 0]
        n = rows.shape[0]
        return self._gated(layer_idx, kbuf[:n, :, :columns], vbuf[:n, :, :columns], value)

    def _gated(self, layer: int, keys: torch.Tensor, values: torch.Tensor, new_values: torch.Tensor):
        if self._gates is None:
            return keys, values
        return self._gates.scale(layer, keys, values, new_values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """0: positions are always given explicitly (``position_ids``), never counted from the cache."""
        return 0

    is_compileable = False


def decode_mask(lengths: torch.Tensor, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, 1, 1, columns) additive mask: row b sees columns ``0 .. lengths[b]`` (its own past and the
    key written in this step), the smallest float elsewhere."""
    cols = torch.arange(columns, device=lengths.device)
    visible = cols.unsqueeze(0) <= lengths.unsqueeze(1)
    return _additive(visible, dtype).view(lengths.shape[0], 1, 1, columns)


def prefill_mask(lengths: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(g, 1, T, T) additive mask for right-padded prompts: query i of row b sees keys j <= i with
    j < lengths[b] (a padding query sees the prompt, so no row of the softmax is empty)."""
    idx = torch.arange(tokens, device=lengths.device)
    causal = idx.view(1, tokens, 1) >= idx.view(1, 1, tokens)
    real = idx.view(1, 1, tokens) < lengths.view(-1, 1, 1)
    return _additive(causal & real, dtype).unsqueeze(1)


def prefixed_prefill_mask(lengths: torch.Tensor, starts: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(g, 1, T, max(starts) + T) additive mask for right-padded prompts after per-row prefixes of
    ``starts[b]`` columns: query i of row b sees its prefix and its prompt's keys j <= i, j < lengths[b]."""
    columns = int(starts.max()) + tokens
    c = torch.arange(columns, device=lengths.device).view(1, 1, columns)
    i = torch.arange(tokens, device=lengths.device).view(1, tokens, 1)
    s = starts.view(-1, 1, 1)
    visible = (c < s) | ((c - s <= i) & (c - s < lengths.view(-1, 1, 1)))
    return _additive(visible, dtype).unsqueeze(1)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)
