"""What LoHa and LoKr share (both from LyCORIS, as Hugging Face PEFT implements them): the config
fields ``r``, ``alpha`` (scale s = α / r), ``rank_dropout`` and ``module_dropout``, their PEFT file
fields, and a parallel delta base whose forward applies the two dropouts around the method's Δh.

Dropouts (training only, as PEFT's ``LycorisLayer``):
    module_dropout p_m: the whole Δh is skipped with probability p_m;
    rank_dropout p_r:   each output row of ΔW is kept with probability 1 − p_r: Δh ← (m / mean(m)) ⊙ Δh
                        (LoKr rescales by mean(m) only with ``rank_dropout_scale``, LoHa always).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from peftlab.core.config import AdapterConfig
from peftlab.core.delta import Delta
from peftlab.core.layers import layer_info, to_module_layout
from peftlab.methods.reparam.peft_fields import refuse_unsupported, targeting_from_peft


@dataclass(kw_only=True)
class LycorisConfig(AdapterConfig):
    """Rank ``r``, scale ``alpha / r``, training-time ``rank_dropout`` and ``module_dropout``."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    def validate(self) -> None:
        self._check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", "a positive int")
        self._check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
                    "alpha", "a positive number")
        for name in ("rank_dropout", "module_dropout"):
            v = getattr(self, name)
            self._check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, name, "a number in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def lycoris_peft_fields(self) -> dict[str, Any]:
        """PEFT's fields common to LOHA and LOKR (targeting aside)."""
        return {
            "r": self.r, "alpha": self.alpha, "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
            "rank_pattern": {}, "alpha_pattern": {}, "use_effective_conv2d": False,
        }


def lycoris_kwargs_from_peft(d: Mapping[str, Any], peft_type: str) -> dict[str, Any]:
    """Our LycorisConfig fields from PEFT's (rank / alpha patterns are refused). ``init_weights``
    only shapes a fresh adapter, never a loaded one, so it is not read here."""
    refuse_unsupported(d, peft_type, {"rank_pattern": ({},), "alpha_pattern": ({},)})
    return {
        "r": int(d.get("r", 8)), "alpha": d.get("alpha", 8),
        "rank_dropout": float(d.get("rank_dropout", 0.0)), "module_dropout": float(d.get("module_dropout", 0.0)),
        **targeting_from_peft(d),
    }


def rank_dropout_mask(rows: int, p: float, rescale: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """PEFT's rank dropout: a keep mask over the ``rows`` output rows of ΔW (P(keep) = 1 − p), divided
    by its mean when ``rescale`` (an all-dropped mask stays zero)."""
    keep = (torch.rand(rows, device=device) > p).to(dtype)
    return keep / keep.mean().clamp_min(1 / rows) if rescale else keep


class LycorisDelta(Delta):
    """Parallel delta Δh = s · ΔW x (ΔW from the subclass's factors) with LyCORIS's two dropouts."""

    site = "parallel"
    merges_into = ("weight",)
    #: Whether rank dropout divides the mask by its mean (LoHa: always; LoKr: ``rank_dropout_scale``).
    rescale_rank_dropout = True

    def __init__(self, base: nn.Module, cfg: LycorisConfig):
        super().__init__()
        info = layer_info(base)
        self.in_features, self.out_features = info.in_features, info.out_features
        self.r, self.scaling = cfg.r, cfg.scaling
        self.rank_p, self.module_p = float(cfg.rank_dropout), float(cfg.module_dropout)

    def dropping(self) -> bool:
        """Whether a dropout acts in this call (training with a nonzero rate)."""
        return self.training and (self.rank_p > 0 or self.module_p > 0)

    def delta_h(self, x: torch.Tensor) -> torch.Tensor:
        """s · ΔW x without dropout, x (..., in) in the delta's dtype."""
        raise NotImplementedError

    def delta_out_in(self) -> torch.Tensor:
        """s · ΔW in (out, in) layout."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = s · ΔW x, skipped with probability module_dropout and row-masked by rank_dropout in training."""
        ref = next(iter(self.parameters()))
        out_dtype = x.dtype if y is None else y.dtype
        if self.training and self.module_p > 0 and torch.rand(1).item() <= self.module_p:
            return x.new_zeros(*x.shape[:-1], self.out_features, dtype=out_dtype)
        out = self.delta_h(x.to(ref.dtype))
        if self.training and self.rank_p > 0:
            out = out * rank_dropout_mask(self.out_features, self.rank_p, self.rescale_rank_dropout, out.device, out.dtype)
        return out.to(out_dtype)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = s · (the method's ΔW) in the module's own weight layout."""
        return {"weight": to_module_layout(base, self.delta_out_in().detach())}
