"""OFT: orthogonal finetuning (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning"), as Hugging Face PEFT 0.21's OFT.

The layer's input is rotated by a block-diagonal orthogonal matrix before the frozen weight:

    x ← x · BD(R_1, …, R_D),   h = W0 BD(R)ᵀ x + b,   R_d = Cayley(S_d),  S_d skew-symmetric (b × b)

so the merged weight is W' = W0 BD(R)ᵀ (R on the input side, the columns of W0; the bias is
untouched) and ΔW = W' − W0 depends on W0. S = 0 at init: R = I, identity. Each S_d is stored as
its strict upper triangle, b(b−1)/2 numbers (PEFT's ``oft_R.weight``, shape (D, b(b−1)/2); (1, …)
with ``block_share``, one block for all). The Cayley transform and block algebra are
``orthogonal.py``'s: exact by default (R orthogonal), or PEFT's truncated Cayley-Neumann series with
``neumann=true`` (PEFT's own default; its two forms use opposite signs of S, see ``orthogonal.py``).

Options as PEFT: exactly one of ``r`` (number of blocks) and ``block_size`` is nonzero; one that does
not divide the layer's input size is moved to the nearest divisor with a warning, as PEFT does.
Not implemented: PEFT's ``coft`` (constrained OFT) and ``bias`` other than "none" (files with them
are refused); PEFT 0.21 builds OFT's ``module_dropout`` but never applies it, so it is read and ignored.

Layers: ``nn.Linear`` and GPT-2's ``Conv1D`` (PEFT's OFT has no Conv1D). Site: input (the rotation
of x), so a mixed batch rotates each row by its own adapter's blocks in one gathered einsum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from peftlab.core.config import AdapterConfig
from peftlab.core.delta import Delta, per_row
from peftlab.core.layers import layer_info, to_module_layout, weight_out_in
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS
from peftlab.methods.reparam.orthogonal import (
    cayley, cayley_neumann, identity_blocks, oft_blocks, rotate_blocks, skew_from_upper,
)
from peftlab.methods.reparam.peft_fields import peft_config_dict, refuse_unsupported, targeting_from_peft


@dataclass(kw_only=True)
class OftConfig(AdapterConfig):
    """OFT: ``r`` blocks or blocks of ``block_size`` (one of them 0), ``block_share`` (one block for
    all), ``neumann`` (PEFT's Cayley-Neumann approximation with ``neumann_terms`` terms) instead of
    the exact Cayley transform."""

    r: int = 0
    block_size: int = 32
    block_share: bool = False
    neumann: bool = False
    neumann_terms: int = 5

    def validate(self) -> None:
        for name in ("r", "block_size"):
            v = getattr(self, name)
            self._check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "an int >= 0")
        self._check((self.r == 0) != (self.block_size == 0), "block_size",
                    f"exactly one of r (now {self.r}) and block_size nonzero: r × block_size = in_features")
        self._check(isinstance(self.block_share, bool), "block_share", "true or false")
        self._check(isinstance(self.neumann, bool), "neumann", "true or false")
        t = self.neumann_terms
        self._check(isinstance(t, int) and not isinstance(t, bool) and t >= 1, "neumann_terms", "an int >= 1")

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``OFTConfig`` fields."""
        fields = {
            "r": self.r, "oft_block_size": self.block_size, "block_share": self.block_share,
            "use_cayley_neumann": self.neumann, "num_cayley_neumann_terms": self.neumann_terms,
            "coft": False, "eps": 6e-5, "module_dropout": 0.0, "bias": "none", "init_weights": True, "fan_in_fan_out": False,
        }
        return peft_config_dict("OFT", fields, self, placed, OftLinear)


def _config_from_peft(d: dict[str, Any]) -> OftConfig:
    refuse_unsupported(d, "OFT", {"coft": False, "bias": "none"})
    return OftConfig(
        r=int(d.get("r", 0)), block_size=int(d.get("oft_block_size", 32)), block_share=bool(d.get("block_share", False)),
        neumann=bool(d.get("use_cayley_neumann", True)), neumann_terms=int(d.get("num_cayley_neumann_terms", 5)),
        **targeting_from_peft(d),
    )


def oft_rotation(vec: torch.Tensor, block_size: int, neumann_terms: int = 0) -> torch.Tensor:
    """The blocks R_d (D, b, b) from their upper triangles (D, b(b−1)/2): exact Cayley (I − S)(I + S)⁻¹,
    or PEFT's ``neumann_terms``-term Neumann series of (I + S)(I − S)⁻¹ when ``neumann_terms`` > 0."""
    s = skew_from_upper(vec, block_size)
    return cayley_neumann(s, neumann_terms) if neumann_terms > 0 else cayley(s)


class OftLinear(Delta):
    """OFT on ``nn.Linear`` or ``Conv1D``: input site, x ← x · BD(R)."""

    site = "input"
    merges_into = ("weight",)
    merge_uses_base = True

    def __init__(self, base: nn.Module, cfg: OftConfig, where: str = ""):
        super().__init__()
        info = layer_info(base)
        self.in_features, self.out_features = info.in_features, info.out_features
        self.blocks, self.block_size = oft_blocks(info.in_features, cfg.r, cfg.block_size, where)
        self.block_share = cfg.block_share
        self.neumann_terms = cfg.neumann_terms if cfg.neumann else 0
        n = self.block_size * (self.block_size - 1) // 2
        # PEFT's key: ``oft_R.weight``.
        self.oft_R = nn.ParameterDict({"weight": nn.Parameter(torch.zeros(1 if cfg.block_share else self.blocks, n))})

    def rotation(self) -> torch.Tensor:
        """R_d for every block (D, b, b) (the shared block repeated with ``block_share``)."""
        r = oft_rotation(self.oft_R["weight"], self.block_size, self.neumann_terms)
        return r.expand(self.blocks, -1, -1) if self.block_share else r

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x · BD(R)."""
        r = self.rotation()
        return rotate_blocks(x.to(r.dtype), r).to(x.dtype)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = W0 BD(R)ᵀ − W0 (each row of W0 rotated by BD(R)ᵀ), in the module's layout."""
        r = self.rotation().detach()
        w = weight_out_in(base).to(r.dtype)
        return {"weight": to_module_layout(base, rotate_blocks(w, r.transpose(-1, -2)) - w)}

    def rank(self) -> int:
        """Upper bound: ΔW = W0 (BD(R)ᵀ − I)."""
        return min(self.in_features, self.out_features)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Row i rotated by its slot's blocks (slot −1: identity blocks), one gathered einsum.
        None (sub-batches) when the adapters' blocks differ in size."""
        present = [d for d in deltas if d is not None]
        if len({(d.blocks, d.block_size) for d in present}) > 1:
            return None
        rots = [d.rotation() if d is not None else None for d in deltas]
        rows = per_row(rots, slot, identity_blocks(next(r for r in rots if r is not None)))
        return rotate_blocks(x.to(rows.dtype), rows, per_row=True).to(x.dtype)


def _build(model: nn.Module, cfg: OftConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    return {name: OftLinear(m, cfg, f" at {name}") for name, m in modules.items()}


register_method(
    "oft", OftConfig, _build, family="reparam", sites=("input",), merges=True, per_row=True,
    example="oft[block_size=8,targets=q_proj|v_proj]", default_lr=1e-2,
    peft=PeftFormat("OFT", read=_config_from_peft, write=OftConfig.to_peft),
)
