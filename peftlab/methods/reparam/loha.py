"""LoHa: low-rank Hadamard product (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS), as Hugging Face PEFT's LOHA.

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   W1a, W2a ∈ R^{out×r},  W1b, W2b ∈ R^{r×in},  s = α / r

PEFT's init: W1a, W1b, W2a Kaiming-uniform (a = √5), W2b = 0, so ΔW = 0 at init. rank(ΔW) ≤ r²:
the Hadamard product of two rank-r matrices is the rank-r² product U V with U = W1a ⊙̂ W2a (columns
u_ij = W1a[:, i] ⊙ W2a[:, j]) and V = W1b ⊙̂ W2b (rows v_ij = W1b[i] ⊙ W2b[j]) (:func:`hadamard_factors`).
The forward uses that factored form when it is cheaper, r²(in + out) < in·out, and ΔW otherwise.

Layers: ``nn.Linear`` and GPT-2's ``Conv1D`` (PEFT's LOHA has no Conv1D: such files are peftlab's
alone; PEFT refuses them loudly). Files: PEFT's keys ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``,
``hada_w2_b``. Mixed batches: one gathered pair of batched matmuls (the factors U, V or ΔW per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.delta import Delta, per_row
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS
from peftlab.methods.reparam.lycoris import LycorisConfig, LycorisDelta, lycoris_kwargs_from_peft
from peftlab.methods.reparam.peft_fields import peft_config_dict


@dataclass(kw_only=True)
class LohaConfig(LycorisConfig):
    """LoHa: rank ``r`` of each Hadamard factor (ΔW has rank ≤ r²), scale ``alpha / r``, LyCORIS dropouts."""

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``LoHaConfig`` fields."""
        return peft_config_dict("LOHA", {"init_weights": True, **self.lycoris_peft_fields()}, self, placed, LohaLinear)


def _config_from_peft(d: dict[str, Any]) -> LohaConfig:
    return LohaConfig(**lycoris_kwargs_from_peft(d, "LOHA"))


# -- math -------------------------------------------------------------------------------------------
def loha_weight(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s · (W1a W1b) ⊙ (W2a W2b), (out, in)."""
    return (w1a @ w1b) * (w2a @ w2b) * scaling


def hadamard_factors(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U V = (W1a W1b) ⊙ (W2a W2b): U (out, r²) = column-wise Khatri-Rao product of W1a, W2a,
    V (r², in) = row-wise one of W1b, W2b (rank ≤ r²)."""
    u = (w1a.unsqueeze(2) * w2a.unsqueeze(1)).reshape(w1a.shape[0], -1)
    v = (w1b.unsqueeze(1) * w2b.unsqueeze(0)).reshape(-1, w1b.shape[1])
    return u, v


class LohaLinear(LycorisDelta):
    """LoHa on ``nn.Linear`` or ``Conv1D``: parallel site, Δh = s · ((W1a W1b) ⊙ (W2a W2b)) x."""

    def __init__(self, base: nn.Module, cfg: LohaConfig):
        super().__init__(base, cfg)
        out_f, in_f, r = self.out_features, self.in_features, cfg.r
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_f))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, r))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_f))
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    @property
    def factored(self) -> bool:
        """Whether Δh goes through the rank-r² factors (cheaper than ΔW when r²(in + out) < in·out)."""
        return self.r * self.r * (self.in_features + self.out_features) < self.in_features * self.out_features

    def _weights(self) -> tuple[torch.Tensor, ...]:
        return self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b

    def delta_h(self, x: torch.Tensor) -> torch.Tensor:
        """s · U (V x) when factored, else s · ΔW x."""
        if self.factored:
            u, v = hadamard_factors(*self._weights())
            return F.linear(F.linear(x, v) * self.scaling, u)
        return F.linear(x, self.delta_out_in())

    def delta_out_in(self) -> torch.Tensor:
        """s · (W1a W1b) ⊙ (W2a W2b)."""
        return loha_weight(*self._weights(), self.scaling)

    def rank(self) -> int:
        return min(self.r * self.r, self.in_features, self.out_features)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Row i uses its slot's adapter: gathered rank-r² factors (zero-padded to the largest r²) and two
        bmm, or, when any adapter is cheaper dense, gathered ΔW and one bmm. Slot −1 gathers zeros.
        None (sub-batches) while a dropout acts."""
        present = [d for d in deltas if d is not None]
        if not all(type(d) is LohaLinear for d in present) or any(d.dropping() for d in present):
            return None
        ref = present[0].hada_w1_a
        xf = x.reshape(x.shape[0], -1, x.shape[-1]).to(ref.dtype)  # (batch, tokens, in)
        if all(d.factored for d in present):
            k = max(d.r for d in present) ** 2
            uv = [hadamard_factors(*d._weights()) if d is not None else None for d in deltas]
            u_rows = per_row([F.pad(f[0] * d.scaling, (0, k - f[0].shape[1])) if f else None for f, d in zip(uv, deltas)],
                             slot, ref.new_zeros(ref.shape[0], k))
            v_rows = per_row([F.pad(f[1], (0, 0, 0, k - f[1].shape[0])) if f else None for f in uv],
                             slot, ref.new_zeros(k, xf.shape[-1]))
            out = torch.bmm(torch.bmm(xf, v_rows.transpose(1, 2)), u_rows.transpose(1, 2))
        else:
            w = per_row([d.delta_out_in() if d is not None else None for d in deltas], slot,
                        ref.new_zeros(ref.shape[0], xf.shape[-1]))
            out = torch.bmm(xf, w.transpose(1, 2))
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(y.dtype)


def _build(model: nn.Module, cfg: LohaConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    return {name: LohaLinear(m, cfg) for name, m in modules.items()}


register_method(
    "loha", LohaConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="loha[r=4,alpha=8,targets=q_proj|v_proj]", default_lr=1e-2,
    peft=PeftFormat("LOHA", read=_config_from_peft, write=LohaConfig.to_peft),
)
