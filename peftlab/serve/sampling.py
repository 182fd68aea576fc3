"""Choosing each row's next token: greedy, or sampled with temperature and top-p, reproducibly.

Row i with temperature ``t_i = 0`` takes ``argmax(logits_i)``. Otherwise

    p = softmax(logits_i / t_i),  keep the smallest set of most likely tokens whose mass reaches
    top_p_i (nucleus sampling), renormalize, and take the token where the cumulative mass first
    exceeds u_i,

with ``u_i ∈ [0, 1)`` a counter-based hash of (the request's seed, the index of the token in its
output) (:func:`uniforms`). No random generator state is shared between rows or steps, so a seeded
request samples the same tokens whether it runs alone or in any batch, in one vectorized
computation for the whole batch.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32;
    multipliers below 2**31 keep every product inside int64."""
    h = h & _MASK32
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & _MASK32
    h = ((h ^ (h >> 15)) * 0x68E31DA5) & _MASK32
    h = ((h ^ (h >> 16)) * 0x2C1B3C6D) & _MASK32
    return h ^ (h >> 15)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """u ∈ [0, 1) per row from (seed, step): float32 with 24 random bits."""
    lo = _mix32(seeds & _MASK32)
    hi = _mix32((seeds >> 32) ^ 0x5BD1E995)
    h = _mix32(lo ^ _mix32(hi + steps * 0x3C6EF372))
    return (h >> 8).to(torch.float32) / float(1 << 24)


def next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The next token of each row (see the module docstring). ``logits`` (n, vocab); the others (n,)."""
    tokens = logits.max(dim=-1).indices  # = argmax (the first maximum too), several times faster on CPU
    sampled = (temperature > 0).nonzero().squeeze(1)
    if sampled.numel() == 0:
        return tokens
    lg = logits.index_select(0, sampled).float() / temperature.index_select(0, sampled).float().unsqueeze(1)
    probs = torch.softmax(lg, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
    keep = before < top_p.index_select(0, sampled).float().unsqueeze(1)
    keep[:, 0] = True
    kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    cdf = kept.cumsum(dim=-1)
    u = uniforms(seeds.index_select(0, sampled), steps.index_select(0, sampled)).to(cdf.device)
    target = (u * cdf[:, -1]).unsqueeze(1)
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    # never land on a dropped token (possible only through float rounding at the edge)
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)
    return tokens.index_copy(0, sampled, order.gather(1, pick).squeeze(1))
