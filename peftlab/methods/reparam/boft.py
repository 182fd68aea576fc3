"""BOFT: orthogonal finetuning with butterfly factorization (Liu et al. 2024, "Parameter-Efficient
Orthogonal Finetuning via Butterfly Factorization"), as Hugging Face PEFT 0.21's BOFT.

A dense orthogonal M is the product of m butterfly factors, each a permuted block-diagonal
orthogonal matrix, and a trainable scale s per output row:

    M = B_{m−1} ⋯ B_0,   B_i = P_i BD(R_i1, …, R_iD) P_iᵀ,   R = Cayley(S), S = (A − Aᵀ)/2
    h = s ⊙ (W0 Mᵀ x) + b,      W' = diag(s) W0 Mᵀ,   ΔW = W' − W0 (depends on W0)

A (PEFT's ``boft_R``, shape (m, D, b, b)) = 0 and s (``boft_s``, (out, 1)) = 1 at init: identity.
P_i is PEFT's block butterfly permutation (P_0 = I), so m = ``n_butterfly_factor`` factors of D
blocks give a dense M from m·D·b² numbers. The Cayley transform and the butterfly algebra are
``orthogonal.py``'s (shared with OFT); x · M is applied factor by factor, never as a dense matrix.

Site: parallel, Δh = s ⊙ W0 (Mᵀx − x) + (s − 1) ⊙ W0 x, where W0 x is the base output without its
bias: one extra product with W0 per call (the rotation acts before W0 and the scale after it, so
neither an input nor an output site alone can hold it).

Options as PEFT: exactly one of ``block_size`` and ``block_num`` nonzero, with PEFT's divisibility
rules per layer (refused, not adjusted); ``dropout``: PEFT's multiplicative dropout (in training,
⌊p·D⌋ blocks of one random factor become I). Note: PEFT without its CUDA extension (any CPU-only
machine) silently trains with one factor whatever ``boft_n_butterfly_factor`` says, and writes files
whose ``boft_R`` holds one factor: peftlab refuses those files (shape mismatch) unless the factor
count is 1. Layers: ``nn.Linear`` and GPT-2's ``Conv1D`` (PEFT's BOFT has no Conv1D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.delta import Delta, per_row
from peftlab.core.layers import layer_info, to_module_layout, weight_out_in
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS
from peftlab.methods.reparam.lora.functional import without_bias
from peftlab.methods.reparam.orthogonal import (
    butterfly_perms, butterfly_rotate, cayley, identity_blocks, identity_dropout, skew_from_square,
)
from peftlab.methods.reparam.peft_fields import peft_config_dict, refuse_unsupported, targeting_from_peft


@dataclass(kw_only=True)
class BoftConfig(AdapterConfig):
    """BOFT: blocks of ``block_size`` or ``block_num`` blocks (one of them 0), ``n_butterfly_factor``
    factors, multiplicative ``dropout``."""

    block_size: int = 4
    block_num: int = 0
    n_butterfly_factor: int = 1
    dropout: float = 0.0

    def validate(self) -> None:
        for name in ("block_size", "block_num"):
            v = getattr(self, name)
            self._check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "an int >= 0")
        self._check((self.block_size == 0) != (self.block_num == 0), "block_num",
                    f"exactly one of block_size (now {self.block_size}) and block_num nonzero")
        f = self.n_butterfly_factor
        self._check(isinstance(f, int) and not isinstance(f, bool) and f >= 1, "n_butterfly_factor", "an int >= 1")
        self._check(isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1,
                    "dropout", "a number in [0, 1)")

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``BOFTConfig`` fields."""
        fields = {
            "boft_block_size": self.block_size, "boft_block_num": self.block_num,
            "boft_n_butterfly_factor": self.n_butterfly_factor, "boft_dropout": self.dropout, "bias": "none",
            "init_weights": True, "fan_in_fan_out": False,
        }
        return peft_config_dict("BOFT", fields, self, placed, BoftLinear)


def _config_from_peft(d: dict[str, Any]) -> BoftConfig:
    refuse_unsupported(d, "BOFT", {"bias": "none"})
    return BoftConfig(
        block_size=int(d.get("boft_block_size", 4)), block_num=int(d.get("boft_block_num", 0)),
        n_butterfly_factor=int(d.get("boft_n_butterfly_factor", 1)), dropout=float(d.get("boft_dropout", 0.0)),
        **targeting_from_peft(d),
    )


def boft_blocks(in_features: int, cfg: BoftConfig, where: str) -> tuple[int, int]:
    """(block_num, block_size) for a layer with ``in_features`` inputs, under PEFT's rules."""
    g = 2 ** (cfg.n_butterfly_factor - 1)

    def bad(field: str, why: str) -> ConfigError:
        return ConfigError(f"BoftConfig.{field}={getattr(cfg, field)!r} is invalid{where}: {why}")

    if cfg.block_num:
        num = cfg.block_num
        if in_features % num:
            raise bad("block_num", f"in_features {in_features} must be divisible by it")
        if g > 1 and (cfg.n_butterfly_factor - 1 > int(math.log2(num)) or num % g):
            raise bad("block_num", f"it must be a multiple of 2^(n_butterfly_factor − 1) = {g}")
        size = in_features // num
    else:
        size = cfg.block_size
        if in_features % size or (g > 1 and in_features % (size * g)):
            raise bad("block_size", f"in_features {in_features} must be divisible by block_size × {g}")
        num = in_features // size
    if g > 1 and (num % 2 or size % 2):
        raise bad("n_butterfly_factor", f"more than one factor needs an even block count and size (got {num}, {size})")
    return num, size


class BoftLinear(Delta):
    """BOFT on ``nn.Linear`` or ``Conv1D``: parallel site, Δh = s ⊙ W0 (Mᵀx − x) + (s − 1) ⊙ W0 x."""

    site = "parallel"
    merges_into = ("weight",)
    merge_uses_base = True

    def __init__(self, base: nn.Module, cfg: BoftConfig, where: str = ""):
        super().__init__()
        info = layer_info(base)
        self.__dict__["base_layer"] = base  # a reference, not a submodule
        self.in_features, self.out_features = info.in_features, info.out_features
        self.block_num, self.block_size = boft_blocks(info.in_features, cfg, where)
        self.p = float(cfg.dropout)
        m = cfg.n_butterfly_factor
        self.boft_R = nn.Parameter(torch.zeros(m, self.block_num, self.block_size, self.block_size))
        self.boft_s = nn.Parameter(torch.ones(info.out_features))  # 1-d (no weight decay); files: (out, 1)
        for i, perm in enumerate(butterfly_perms(info.in_features, self.block_num, self.block_size, m)):
            if i > 0:  # P_0 is the identity
                self.register_buffer(f"perm_{i}", perm, persistent=False)
                self.register_buffer(f"inv_{i}", torch.argsort(perm), persistent=False)

    def perms(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """(perm_i, its inverse) per factor, None for the identity P_0."""
        return [None] + [(getattr(self, f"perm_{i}"), getattr(self, f"inv_{i}")) for i in range(1, self.boft_R.shape[0])]

    def rotation_blocks(self) -> torch.Tensor:
        """Cayley blocks (m, D, b, b), with PEFT's multiplicative dropout on one random factor in training."""
        m, d, b, _ = self.boft_R.shape
        r = cayley(skew_from_square(self.boft_R.reshape(m * d, b, b))).reshape(m, d, b, b)
        if self.training and self.p > 0:
            i = int(torch.randint(0, m, (1,)).item())
            r = torch.cat([r[:i], identity_dropout(r[i], self.p).unsqueeze(0), r[i + 1:]])
        return r

    def dense_rotation(self) -> torch.Tensor:
        """M (in, in), built only for merging: I · M."""
        r = self.rotation_blocks()
        return butterfly_rotate(torch.eye(self.in_features, device=r.device, dtype=r.dtype), r, self.perms())

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = s ⊙ W0 (x·M − x) + (s − 1) ⊙ (y − b)."""
        assert y is not None
        r = self.rotation_blocks()
        xf = x.to(r.dtype)
        moved = butterfly_rotate(xf, r, self.perms()) - xf
        w = weight_out_in(self.base_layer).to(r.dtype)
        s = self.boft_s
        out = s * F.linear(moved, w) + (s - 1) * without_bias(self.base_layer, y).to(r.dtype)
        return out.to(y.dtype)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = diag(s) W0 Mᵀ − W0, in the module's layout."""
        m = self.dense_rotation().detach()
        w = weight_out_in(base).to(m.dtype)
        return {"weight": to_module_layout(base, self.boft_s.detach().unsqueeze(1) * (w @ m.T) - w)}

    def rank(self) -> int:
        """Upper bound: ΔW = diag(s) W0 Mᵀ − W0."""
        return min(self.in_features, self.out_features)

    def file_state(self) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R.detach(), "boft_s": self.boft_s.detach().unsqueeze(1)}

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.boft_R.copy_(state["boft_R"])
            self.boft_s.copy_(state["boft_s"].reshape(-1))

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Row i uses its slot's blocks and scale (slot −1: identity blocks, s = 1), gathered: one
        butterfly pass with per-row blocks and one product with W0. None (sub-batches) when the
        adapters' factor shapes differ or a dropout acts."""
        present = [d for d in deltas if d is not None]
        if len({tuple(d.boft_R.shape) for d in present}) > 1 or any(d.training and d.p > 0 for d in present):
            return None
        first = present[0]
        rots = [d.rotation_blocks() if d is not None else None for d in deltas]
        ref = next(r for r in rots if r is not None)
        r_rows = per_row(rots, slot, identity_blocks(ref))
        s_rows = per_row([d.boft_s if d is not None else None for d in deltas], slot, ref.new_ones(first.out_features))
        xf = x.reshape(x.shape[0], -1, x.shape[-1]).to(ref.dtype)
        moved = butterfly_rotate(xf, r_rows, first.perms(), per_row=True) - xf
        w = weight_out_in(first.base_layer).to(ref.dtype)
        base_out = without_bias(first.base_layer, y).reshape(x.shape[0], -1, first.out_features).to(ref.dtype)
        s = s_rows.unsqueeze(1)
        out = s * F.linear(moved, w) + (s - 1) * base_out
        return out.reshape(*x.shape[:-1], first.out_features).to(y.dtype)


def _build(model: nn.Module, cfg: BoftConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    return {name: BoftLinear(m, cfg, f" at {name}") for name, m in modules.items()}


register_method(
    "boft", BoftConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="boft[block_size=4,n_butterfly_factor=2,targets=q_proj|v_proj]", default_lr=1e-2,
    peft=PeftFormat("BOFT", read=_config_from_peft, write=BoftConfig.to_peft),
)
