"""Orthogonal-finetuning math shared by OFT and BOFT: skew-symmetric matrices, the Cayley transform,
block-diagonal rotations and butterfly permutations, as pure functions.

OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning") and BOFT (Liu
et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization") rotate a
layer's input by an orthogonal R built from skew-symmetric blocks S (Sᵀ = −S) by the Cayley transform.

Conventions are Hugging Face PEFT 0.21's, so that its files compute the same function here:

* exact Cayley: R = (I − S)(I + S)⁻¹ (``torch.linalg.solve(I + S, I − S, left=False)``). This is
  the textbook form (I + Q)(I − Q)⁻¹ of Q = −S: orthogonal, RᵀR = I, and R = I at S = 0;
* OFT's Cayley-Neumann option truncates (I + S)(I − S)⁻¹ = I + 2 Σ_{k≥1} S^k (note: the other sign
  of S than the exact form, as in PEFT) to I + 2S + ... + 2S^{n−2} + S^{n−1} (n terms; PEFT's loop
  makes n = 3 and n = 4 the same): not exactly orthogonal, but no matrix solve;
* a layer input x (row vector, blocks x_d of size b) is rotated as x_d ← x_d R_d, i.e. x ← x · BD(R)
  with BD the block-diagonal matrix, so the rotated layer computes W0 BD(R)ᵀ x: R acts on the input
  side of W0 (its columns).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch


def skew_from_upper(vec: torch.Tensor, n: int) -> torch.Tensor:
    """S (..., n, n) with its strict upper triangle (row-major, as ``torch.triu_indices(n, n, 1)``)
    equal to ``vec`` (..., n(n−1)/2) and S = −Sᵀ (OFT's ``oft_R`` layout)."""
    rows, cols = torch.triu_indices(n, n, 1, device=vec.device)
    s = vec.new_zeros(*vec.shape[:-1], n, n)
    s[..., rows, cols] = vec
    return s - s.transpose(-1, -2)


def skew_from_square(a: torch.Tensor) -> torch.Tensor:
    """S = (A − Aᵀ) / 2, the skew-symmetric part of square blocks A (BOFT's ``boft_R`` layout)."""
    return 0.5 * (a - a.transpose(-1, -2))


def cayley(s: torch.Tensor) -> torch.Tensor:
    """R = (I − S)(I + S)⁻¹ for skew-symmetric S (..., n, n): orthogonal, I at S = 0 (PEFT's exact form)."""
    eye = torch.eye(s.shape[-1], device=s.device, dtype=s.dtype).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s, left=False)


def cayley_neumann(s: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated Neumann series of (I + S)(I − S)⁻¹ with ``terms`` terms:
    I (1), I + 2S (2), I + 2S + 2S² + S³ (3 and 4), I + 2 Σ_{k=1}^{n−2} S^k + S^{n−1} (n ≥ 4)."""
    r = torch.eye(s.shape[-1], device=s.device, dtype=s.dtype).expand_as(s).clone()
    if terms <= 1:
        return r
    r = r + 2 * s
    if terms == 2:
        return r
    power = s @ s
    r = r + 2 * power
    for _ in range(3, terms - 1):
        power = power @ s
        r = r + 2 * power
    return r + power @ s


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """x · BD(R): each size-b slice x_d of the last dimension becomes x_d R_d.

    ``blocks`` is (D, b, b) with D·b = x.shape[-1]; with ``per_row`` it is (batch, D, b, b) and row
    i of x (batch, ..., D·b) uses ``blocks[i]``."""
    d, b = blocks.shape[-3], blocks.shape[-1]
    xb = x.reshape(*x.shape[:-1], d, b)
    out = torch.einsum("n...dk,ndkc->n...dc", xb, blocks) if per_row else torch.einsum("...dk,dkc->...dc", xb, blocks)
    return out.reshape(x.shape)


def identity_blocks(like: torch.Tensor) -> torch.Tensor:
    """Identity blocks shaped as ``like`` (..., b, b): the rotation of rows without an adapter."""
    return torch.eye(like.shape[-1], device=like.device, dtype=like.dtype).expand_as(like)


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """The dense block-diagonal matrix BD(R) of blocks (D, b, b)."""
    return torch.block_diag(*blocks.unbind(0))


def identity_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's multiplicative dropout: ⌊p·D⌋ of the D blocks (D, b, b), chosen at random, become I."""
    d, b = blocks.shape[0], blocks.shape[-1]
    k = int(p * d)
    if k == 0:
        return blocks
    mask = torch.zeros(d, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(d, device=blocks.device)[:k]] = 1
    mask = mask.view(d, 1, 1)
    return (1 - mask) * blocks + mask * torch.eye(b, device=blocks.device, dtype=blocks.dtype)


def nearest_divisor(n: int, wanted: int) -> int:
    """PEFT's OFT adjustment of a block size or block count that does not divide ``n``: the nearest
    divisor of n (the lower one on a tie); n itself when ``wanted`` ≥ n."""
    if wanted >= n:
        return n
    higher = wanted
    while higher <= n and n % higher:
        higher += 1
    lower = wanted
    while lower > 1 and n % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def oft_blocks(in_features: int, r: int, block_size: int, where: str = "") -> tuple[int, int]:
    """(number of blocks, block size) for OFT on ``in_features`` from ``r`` or ``block_size`` (the
    other is 0), adjusted to a divisor with a warning as PEFT does."""
    if r == 0:
        size = block_size if in_features % block_size == 0 else nearest_divisor(in_features, block_size)
        if size != block_size:
            warnings.warn(f"oft{where}: block_size={block_size} does not divide {in_features}; using {size} (as PEFT)",
                          stacklevel=3)
        return in_features // size, size
    count = r if in_features % r == 0 else nearest_divisor(in_features, r)
    if count != r:
        warnings.warn(f"oft{where}: r={r} does not divide {in_features}; using {count} (as PEFT)", stacklevel=3)
    return count, in_features // count


def butterfly_perm(n: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """PEFT's block butterfly permutation of n indices (``block_butterfly_perm``): identity when
    ``factors`` == 0; else n is cut into ``blocks`` chunks, each a run of groups of ``half`` indices
    reordered as the even-numbered groups, then the odd-numbered ones."""
    if factors == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ValueError("invalid number of butterfly blocks")
    chunk = n // blocks
    groups = chunk // half
    order = list(range(0, groups, 2)) + list(range(1, groups, 2))
    within = torch.cat([torch.arange(g * half, g * half + half) for g in order])
    return (torch.arange(0, n, chunk).unsqueeze(1) + within.unsqueeze(0)).reshape(-1)


def butterfly_perms(n: int, block_num: int, block_size: int, n_factors: int) -> list[torch.Tensor]:
    """The permutations P_0..P_{m−1} of BOFT's m = ``n_factors`` butterfly factors (P_0 = identity)."""
    return [butterfly_perm(n, block_num // 2**i, block_size // 2, n_factors - 1) for i in range(n_factors)]


def butterfly_rotate(
    x: torch.Tensor, blocks: torch.Tensor, perms: Sequence[tuple[torch.Tensor, torch.Tensor] | None], per_row: bool = False
) -> torch.Tensor:
    """x · M with M = B_{m−1} ⋯ B_1 B_0, B_i = P_i BD(R_i) P_iᵀ (P_i the permutation matrix with
    P[j, perm_i[j]] = 1), without forming M. ``perms[i]`` is (perm_i, its inverse), or None for the
    identity; ``blocks`` (m, D, b, b), or (batch, m, D, b, b) with ``per_row``. x · P gathers x at
    the inverse permutation, x · Pᵀ at the permutation."""
    for i in reversed(range(len(perms))):
        pair = perms[i]
        if pair is not None:
            x = x.index_select(-1, pair[1])
        x = rotate_blocks(x, blocks[:, i] if per_row else blocks[i], per_row)
        if pair is not None:
            x = x.index_select(-1, pair[0])
    return x
