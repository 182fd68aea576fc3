"""Fused steps: one model call that decodes every running row and prefills the prompts that join.

Why: a forward pass has a cost that does not depend on how many tokens it carries (every weight is
read once, every module's Python runs once: about 60-80 ms for SmolLM2 on one CPU core, the price of
some 50 prompt tokens), and a padded prefill also computes its padding. With separate calls, every
step that admits requests pays that cost again for each prefill group and pays for the padding. A
fused step lays the step's tokens out as one packed sequence of S tokens, batch 1, no padding:

    [ last token of running row 0, ..., of row n−1 | prompt 0's tokens | prompt 1's tokens | ... ]

Every linear layer sees S rows, whichever request they belong to. Attention is the one place that
is per request, so the step's attention is an implementation registered with transformers
(``AttentionInterface``) and selected for the fused call only:

* the n decode tokens attend over their own cache rows, as a decode call does: q (n, H, 1, d)
  against K, V[:n, :, :c] under each row's length mask. Reading K and V is most of attention's
  cost, and a few long rows would make every row read max(len)+1 columns, so c is chosen
  (:func:`split_columns`) to cover most rows; the rows longer than c are gathered and attend again
  over all their columns, and their outputs replace the first ones;
* the prompts come in groups of similar length (sorted, cut as PetS's coordinated batching cuts
  them: :func:`~peftlab.serve.scheduler.length_groups`); each group's tokens are scattered into a
  padded (g, H, T, d) block, attend causally over their own prompt, and are gathered back. Padding
  costs attention only, which grows as T², so the groups keep it small.

The cache (:class:`~peftlab.serve.kv.SlotCache`) writes each token's key and value at its row and
column; the LM head keeps each decode token and each prompt's last token; the adapter bank routes
per token. The engine fuses a step when every row of it is a base or bank (LoRA-family) row and the
model's attention is ``sdpa`` or ``eager``, and only after checking at start that a fused step gives what plain
calls give (:meth:`~peftlab.serve.engine.Engine._check_model`).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from .kv import decode_mask, prefill_mask

if TYPE_CHECKING:
    from .kv import SlotCache

#: The name of the fused step's attention in transformers' attention registry.
ATTENTION_NAME = "peftlab_fused_step"

_ACTIVE: ContextVar[tuple["SlotCache", "FusedStep"] | None] = ContextVar("peftlab_fused_step", default=None)


@dataclass(frozen=True, eq=False)
class PromptGroup:
    """Prompts of similar length whose attention runs as one padded block: cache rows ``row ..
    row+count−1``, their tokens at packed places ``offset .. offset+tokens−1``."""

    row: int
    count: int
    offset: int
    tokens: int
    width: int  # T, the group's longest prompt
    padded_index: torch.Tensor  # (tokens,): each token's place in the group's (count·T) padded block
    mask: torch.Tensor  # (count, 1, T, T)


@dataclass(frozen=True, eq=False)
class FusedStep:
    """Where every token of a fused call goes (see the module docstring): n decode tokens of cache
    rows 0..n−1, then g prompts for fresh rows n .. n+g−1, packed, in groups."""

    n: int
    g: int
    columns: int  # columns every decode token attends over first (see split_columns)
    width: int  # the longest prompt
    token_rows: torch.Tensor  # (S,): the cache row of every token
    token_columns: torch.Tensor  # (S,): its cache column (= its position)
    keep: torch.Tensor  # (n + g,): the packed tokens whose logits are wanted
    decode_mask: torch.Tensor | None  # (n, 1, 1, columns)
    long_rows: torch.Tensor | None  # decode rows longer than ``columns``, attending again over all theirs
    long_columns: int  # max(cache length) + 1: the columns the longest row writes into and reads
    long_mask: torch.Tensor | None  # (len(long_rows), 1, 1, long_columns)
    groups: tuple[PromptGroup, ...]

    @classmethod
    def plan(cls, lengths: list[int], prompt_groups: list[list[int]], device: torch.device,
             dtype: torch.dtype) -> "FusedStep":
        """The layout of a step decoding rows with these cache ``lengths`` (row b writes at column
        lengths[b] and sees columns 0..lengths[b]) and prefilling prompts of the lengths in
        ``prompt_groups`` (in this order) into the rows after them."""
        n = len(lengths)
        dec = torch.tensor(lengths, dtype=torch.long)
        plen = torch.tensor([length for group in prompt_groups for length in group], dtype=torch.long)
        g = int(plen.shape[0])
        ends = torch.cumsum(plen, 0)
        within = torch.arange(int(plen.sum())) - torch.repeat_interleave(ends - plen, plen)  # 0..L_b−1
        prompt_of = torch.repeat_interleave(torch.arange(g), plen)  # the prompt of each prompt token
        groups, row, offset = [], n, 0
        for group in prompt_groups:
            count, tokens, width = len(group), sum(group), max(group)
            local = torch.repeat_interleave(torch.arange(count), torch.tensor(group))
            place = local * width + within[offset : offset + tokens]
            groups.append(PromptGroup(row, count, offset, tokens, width, place.to(device),
                                      prefill_mask(torch.tensor(group, device=device), width, dtype)))
            row, offset = row + count, offset + tokens
        on = {"device": device}
        columns = split_columns(lengths)
        longest = int(dec.max()) + 1 if n else 0
        long_rows = (dec >= columns).nonzero().squeeze(1) if n else torch.zeros(0, dtype=torch.long)
        has_long = long_rows.numel() > 0
        return cls(n=n, g=g, columns=columns, width=max(plen.tolist(), default=0),
                   token_rows=torch.cat([torch.arange(n), n + prompt_of]).to(**on),
                   token_columns=torch.cat([dec, within]).to(**on),
                   keep=torch.cat([torch.arange(n), n + ends - 1]).to(**on),
                   decode_mask=decode_mask(dec.to(**on), columns, dtype) if n else None,
                   long_rows=long_rows.to(**on) if has_long else None, long_columns=longest,
                   long_mask=decode_mask(dec[long_rows].to(**on), longest, dtype) if has_long else None,
                   groups=tuple(groups))


def split_columns(lengths: list[int], gather_cost: float = 3.0) -> int:
    """The columns c every decode row attends over first: the c minimising what attention reads,
    n·c + gather_cost · (rows with length ≥ c) · (max length + 1), a row of length ℓ needing columns
    0..ℓ and a longer row being gathered (a copy, read twice more) to attend over all its columns."""
    if not lengths:
        return 0
    longest = max(lengths) + 1
    ordered = sorted(lengths)
    best, best_cost = longest, float(len(lengths) * longest)
    for length in ordered:  # c = length + 1 covers every row up to this length
        longer = len(ordered) - bisect.bisect_right(ordered, length)
        cost = len(lengths) * (length + 1) + gather_cost * longer * longest
        if cost < best_cost:
            best, best_cost = length + 1, cost
    return best


@functools.cache
def _sdpa() -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def fused_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any):
    """The fused step's attention (transformers' attention-function signature; ``key``/``value`` are
    the step's own, already in the cache). Returns ((1, S, H, d), None): softmax(q Kᵀ·scaling + M) V
    per request, as in the module docstring, through transformers' own sdpa function (given the
    model's other arguments too, so that one it cannot honour, e.g. ``softcap``, raises)."""
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention runs only inside an engine's fused step")
    cache, step = active
    sdpa, layer = _sdpa(), module.layer_idx
    q = query[0]  # (H, S, d)
    heads, _, dim = q.shape
    keys, values = cache.keys[layer], cache.values[layer]
    parts = []
    if step.n:
        qd = q[:, : step.n].transpose(0, 1).unsqueeze(2)  # (n, H, 1, d)
        out, _ = sdpa(module, qd, keys[: step.n, :, : step.columns], values[: step.n, :, : step.columns],
                      step.decode_mask, dropout=0.0, scaling=scaling, **kwargs)
        out = out.reshape(step.n, heads, dim)
        if step.long_rows is not None:
            rows, c = step.long_rows, step.long_columns
            again, _ = sdpa(module, qd.index_select(0, rows), keys[:, :, :c].index_select(0, rows),
                            values[:, :, :c].index_select(0, rows), step.long_mask, dropout=0.0, scaling=scaling, **kwargs)
            out = out.index_copy(0, rows, again.reshape(rows.shape[0], heads, dim))
        parts.append(out)
    for group in step.groups:
        g, width = group.count, group.width
        padded = q.new_zeros(heads, g * width, dim)
        padded[:, group.padded_index] = q[:, step.n + group.offset : step.n + group.offset + group.tokens]
        qp = padded.view(heads, g, width, dim).transpose(0, 1)  # (g, H, T, d)
        rows = slice(group.row, group.row + g)
        out, _ = sdpa(module, qp, keys[rows, :, :width], values[rows, :, :width], group.mask,
                      dropout=0.0, scaling=scaling, **kwargs)  # (g, T, H, d)
        parts.append(out.reshape(g * width, heads, dim)[group.padded_index])
    return torch.cat(parts).unsqueeze(0), None


def register_attention() -> None:
    """Add :func:`fused_attention` to transformers' attention registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, fused_attention)


def unfusable_reason(model: nn.Module) -> str | None:
    """Why the fused attention cannot stand in for the model's, or None: it needs transformers'
    ``sdpa`` or ``eager`` attention (the same math; it computes it with sdpa) without logit
    soft-capping (Gemma-2). Anything else the engine's start-up check catches."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"attention implementation {implementation!r} (sdpa or eager needed)"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping (attn_logit_softcapping)"
    return None


@contextlib.contextmanager
def fused_call(model: nn.Module, cache: "SlotCache", step: FusedStep) -> Iterator[None]:
    """Inside the block, ``model``'s attention is the fused step's (its config names it) and the
    cache writes the step's tokens where ``step`` says."""
    config = model.config
    previous = config._attn_implementation
    token = _ACTIVE.set((cache, step))
    cache.begin_fused(step)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        cache.end()
        _ACTIVE.reset(token)
