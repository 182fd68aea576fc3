"""LoKr / KronA: a Kronecker-product weight delta (Edalati et al. 2022, "KronA"; seed 000 III-C1,
seed 001 §10.3; LyCORIS's LoKr), as Hugging Face PEFT's LOKR.

    ΔW = s · W1 ⊗ W2,   W1 ∈ R^{a×c}, W2 ∈ R^{b×d},   out = a·b, in = c·d,   s = α / r

(a, b) and (c, d) factor out and in by PEFT's rule (:func:`factorization`: the pair nearest √n, or
one factor near ``decompose_factor``). W2 is low-rank, W2 = W2a W2b (rank r), when r < max(b, d) / 2;
W1 too, with ``decompose_both``, when r < max(a, c) / 2. Init (PEFT's default, ``init=peft``): W1 = 0
(W1a = 0), the rest Kaiming-uniform; ``init=lycoris``: W2 = 0 (W2b = 0), the rest Kaiming-uniform.

The forward never forms ΔW: with x (row-major) viewed as X ∈ R^{c×d}, (W1 ⊗ W2) x = vec(W1 X W2ᵀ)
(:func:`kron_apply`), i.e. a·c·d + a·d·b multiply-adds per token instead of a·b·c·d; backward
recomputes W1 X instead of keeping it (``kron_apply.py``).
rank(ΔW) = rank(W1) · rank(W2).

Layers: ``nn.Linear`` and GPT-2's ``Conv1D`` (PEFT's LOKR has no Conv1D: such files are peftlab's
alone). Files: PEFT's keys ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or
``lokr_w2_a``/``lokr_w2_b``. Mixed batches: W1, W2 gathered per row, one batched contraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from peftlab.core.delta import Delta, per_row
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.methods.reparam.kron_apply import kron_apply
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS
from peftlab.methods.reparam.lycoris import LycorisConfig, LycorisDelta, lycoris_kwargs_from_peft
from peftlab.methods.reparam.peft_fields import peft_config_dict

INITS = ("peft", "lycoris")


@dataclass(kw_only=True)
class LokrConfig(LycorisConfig):
    """LoKr: ``r`` (rank of the low-rank Kronecker factors, and s = alpha / r), ``decompose_both``
    (W1 low-rank too), ``decompose_factor`` (−1: factors near √n), ``rank_dropout_scale``, ``init``."""

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init: str = "peft"

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.decompose_both, bool), "decompose_both", "true or false")
        f = self.decompose_factor
        self._check(isinstance(f, int) and not isinstance(f, bool) and (f == -1 or f > 0), "decompose_factor",
                    "-1 or a positive int")
        self._check(isinstance(self.rank_dropout_scale, bool), "rank_dropout_scale", "true or false")
        self._check(self.init in INITS, "init", f"one of {', '.join(INITS)}")

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``LoKrConfig`` fields."""
        fields = {
            "decompose_both": self.decompose_both, "decompose_factor": self.decompose_factor,
            "rank_dropout_scale": self.rank_dropout_scale, "init_weights": True if self.init == "peft" else "lycoris",
            **self.lycoris_peft_fields(),
        }
        return peft_config_dict("LOKR", fields, self, placed, LokrLinear)


def _config_from_peft(d: dict[str, Any]) -> LokrConfig:
    return LokrConfig(
        decompose_both=bool(d.get("decompose_both", False)), decompose_factor=int(d.get("decompose_factor", -1)),
        rank_dropout_scale=bool(d.get("rank_dropout_scale", False)),
        init="lycoris" if d.get("init_weights") == "lycoris" else "peft",
        **lycoris_kwargs_from_peft(d, "LOKR"),
    )


# -- math -------------------------------------------------------------------------------------------
def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of n into m · k: (factor, n / factor) when ``factor`` > 0 divides n; else the
    divisor pairs are walked up from (1, n) while m ≤ ``factor`` (any, for −1) and m < k; the result
    is returned smaller first."""
    if factor > 0 and n % factor == 0:
        return factor, n // factor
    limit = n if factor == -1 else factor
    m, k = 1, n
    while m < k:
        nxt = m + 1
        while n % nxt:
            nxt += 1
        if nxt > limit:
            break
        m, k = nxt, n // nxt
    return (k, m) if m > k else (m, k)


class LokrLinear(LycorisDelta):
    """LoKr on ``nn.Linear`` or ``Conv1D``: parallel site, Δh = s · (W1 ⊗ W2) x."""

    def __init__(self, base: nn.Module, cfg: LokrConfig):
        super().__init__(base, cfg)
        self.rescale_rank_dropout = cfg.rank_dropout_scale
        r = cfg.r
        (a, b), (c, d) = factorization(self.out_features, cfg.decompose_factor), factorization(self.in_features, cfg.decompose_factor)
        self.shapes = (a, b, c, d)
        self.full_w1 = not (cfg.decompose_both and r < max(a, c) / 2)
        self.full_w2 = not r < max(b, d) / 2
        lycoris = cfg.init == "lycoris"
        kaiming = lambda *shape: nn.Parameter(nn.init.kaiming_uniform_(torch.empty(*shape), a=math.sqrt(5)))  # noqa: E731
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape))  # noqa: E731
        if self.full_w1:
            self.lokr_w1 = kaiming(a, c) if lycoris else zeros(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = (kaiming(a, r) if lycoris else zeros(a, r)), kaiming(r, c)
        if self.full_w2:
            self.lokr_w2 = zeros(b, d) if lycoris else kaiming(b, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = kaiming(b, r), (zeros(r, d) if lycoris else kaiming(r, d))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1, W2), the low-rank ones multiplied out (they are small)."""
        w1 = self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_h(self, x: torch.Tensor) -> torch.Tensor:
        """s · vec(W1 X W2ᵀ)."""
        w1, w2 = self.factors()
        return kron_apply(x, w1 * self.scaling, w2)

    def delta_out_in(self) -> torch.Tensor:
        """s · W1 ⊗ W2."""
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scaling

    def rank(self) -> int:
        a, b, c, d = self.shapes
        r1 = min(a, c) if self.full_w1 else min(self.r, a, c)
        r2 = min(b, d) if self.full_w2 else min(self.r, b, d)
        return r1 * r2

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Row i uses (s W1, W2) of its slot, gathered (slot −1: zeros): one einsum over the batch.
        None (sub-batches) when the adapters factor the layer differently or a dropout acts."""
        present = [d for d in deltas if d is not None]
        if (not all(type(d) is LokrLinear for d in present) or len({d.shapes for d in present}) > 1
                or any(d.dropping() for d in present)):
            return None
        a, b, c, d_ = present[0].shapes
        ref = next(iter(present[0].parameters()))
        pairs = [dl.factors() if dl is not None else None for dl in deltas]
        w1_rows = per_row([p[0] * dl.scaling if p else None for p, dl in zip(pairs, deltas)], slot, ref.new_zeros(a, c))
        w2_rows = per_row([p[1] if p else None for p in pairs], slot, ref.new_zeros(b, d_))
        xm = x.reshape(x.shape[0], -1, c, d_).to(ref.dtype)
        out = torch.einsum("nac,ntcd,nbd->ntab", w1_rows, xm, w2_rows)
        return out.reshape(*x.shape[:-1], a * b).to(y.dtype)


def _build(model: nn.Module, cfg: LokrConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    return {name: LokrLinear(m, cfg) for name, m in modules.items()}


register_method(
    "lokr", LokrConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="lokr[r=4,alpha=8,decompose_both=true,targets=q_proj|v_proj]", default_lr=1e-2,
    peft=PeftFormat("LOKR", read=_config_from_peft, write=LokrConfig.to_peft),
)
