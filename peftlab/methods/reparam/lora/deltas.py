"""The LoRA-family deltas: what is placed on a layer, its forward and its merge ΔW.

LoRA (Hu et al. 2021; seed 002 eq. 12):     h = W0 x + s · B A x,   A ∈ R^{r×in}, B ∈ R^{out×r}, B = 0
DoRA (Liu et al. 2024; seed 002 eq. 17-18):  W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row,   m₀ = ‖W0‖_row
    computed as  h = W0 x + (m/n − 1) ⊙ W0 x + (m/n) ⊙ s B A x  with n = ‖W0 + s B A‖_row detached.
PiSSA / OLoRA: h = W0 x + s (B A − B₀ A₀) x, B₀ A₀ the frozen initial product (the base is not touched).

Layers: ``nn.Linear`` and GPT-2's ``Conv1D`` (:class:`LoraLinear`, :class:`DoraLinear`),
``nn.Embedding`` (:class:`LoraEmbedding`) and ``nn.Conv2d`` (:class:`LoraConv2d`). Parameter names are
PEFT's (``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``, ``lora_embedding_A``,
``lora_embedding_B``). Mixed batches go through ``routing.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.delta import Delta
from peftlab.core.layers import layer_info, to_module_layout, weight_out_in
from peftlab.core.quantized import logical_numel
from peftlab.methods.reparam.lora.functional import dora_delta, lora_delta, lora_down, principal_factors, without_bias
from peftlab.methods.reparam.lora.routing import routed_lora

if TYPE_CHECKING:
    from peftlab.methods.reparam.lora.config import LoraConfig


class LoraLinear(Delta):
    """LoRA on ``nn.Linear`` or ``Conv1D``: parallel site, Δh = s · B A x (− s · B₀ A₀ x for PiSSA/OLoRA)."""

    site = "parallel"
    merges_into = ("weight",)
    reads_output = False  # y gives only the output dtype
    #: Whether the delta has DoRA's trainable magnitude (``magnitude_ratio``); read by ``routing.py``.
    has_magnitude = False

    def __init__(self, base: nn.Module, cfg: LoraConfig):
        super().__init__()
        info = layer_info(base)
        self.__dict__["base_layer"] = base  # a reference, not a submodule: the base stays outside the adapter
        self.r, self.scaling, self.p = cfg.r, cfg.scaling, float(cfg.dropout)
        self.lora_A = nn.Linear(info.in_features, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, info.out_features, bias=False)
        self.residual = cfg.init in ("pissa", "olora")
        self.register_buffer("A0", None, persistent=False)
        self.register_buffer("B0", None, persistent=False)
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / cfg.r)
            elif cfg.method == "lora_fa":
                nn.init.orthogonal_(self.lora_A.weight)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
            if self.residual:
                A, B = principal_factors(weight_out_in(base).float(), cfg.init, cfg.r, cfg.scaling)
                self.lora_A.weight.copy_(A)
                self.lora_B.weight.copy_(B)
                self.A0, self.B0 = A.clone(), B.clone()
        if cfg.method == "lora_fa":
            self.lora_A.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = s · B A dropout(x) (− s · B₀ A₀ x for PiSSA/OLoRA)."""
        out = self._lora_out(x.to(self.lora_A.weight.dtype), self.p)
        return out.to(x.dtype if y is None else y.dtype)

    def _lora_out(self, x: torch.Tensor, p: float) -> torch.Tensor:
        out = lora_delta(x, self.lora_A.weight, self.lora_B.weight, self.scaling, p, self.training)
        if self.residual:
            out = out - F.linear(F.linear(x, self.A0) * self.scaling, self.B0)
        return out

    def delta_out_in(self) -> torch.Tensor:
        """ΔW in (out, in) layout: s · (B A − B₀ A₀)."""
        dw = self.lora_B.weight @ self.lora_A.weight
        if self.residual:
            dw = dw - self.B0 @ self.A0
        return self.scaling * dw

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = s · (B A − B₀ A₀) in the module's own weight layout."""
        return {"weight": to_module_layout(base, self.delta_out_in().detach())}

    def rank(self) -> int:
        return 2 * self.r if self.residual else self.r

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Mixed batch as two gathered batched matmuls: row i uses (A_k, B_k, s_k) of its slot k
        (``routing.routed_lora``). PiSSA/OLoRA and other delta types take the sub-batch path."""
        present = [d for d in deltas if d is not None]
        if not all(type(d) in (LoraLinear, DoraLinear) and not d.residual for d in present):
            return None
        return routed_lora(deltas, slot, x, y)


class DoraLinear(LoraLinear):
    """DoRA: parallel site Δh = (m/n − 1) ⊙ (h − b) + (m/n) ⊙ s B A x, n = ‖W0 + s B A‖_row (detached)."""

    merge_uses_base = True
    reads_output = True  # Δh reads h − b
    has_magnitude = True

    def __init__(self, base: nn.Module, cfg: LoraConfig):
        super().__init__(base, cfg)
        with torch.no_grad():
            norm = self._weight_norm()
        self.lora_magnitude_vector = nn.Parameter(norm.clone())

    def _weight_norm(self) -> torch.Tensor:
        """‖W0 + s B A‖ per output row, detached (DoRA §4.3): computed without recording a graph."""
        with torch.no_grad():
            w = weight_out_in(self.base_layer).to(device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype)
            return torch.linalg.vector_norm(w + self.delta_out_in(), dim=1)

    def magnitude_ratio(self) -> torch.Tensor:
        """m / ‖W0 + s B A‖_row, the norm detached as in the DoRA paper (§4.3)."""
        return self.lora_magnitude_vector / self._weight_norm()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = (m/n − 1) ⊙ (h − b) + (m/n) ⊙ s B A dropout(x), n = ‖W0 + s B A‖ per row (detached)."""
        assert y is not None
        g = self.magnitude_ratio()
        xa = x.to(g.dtype)
        if self.training and self.p > 0:
            # As PEFT: with dropout, the base term is recomputed on the same dropped input.
            xa = F.dropout(xa, self.p, True)
            base_out = F.linear(xa, weight_out_in(self.base_layer).to(g.dtype))
        else:
            base_out = without_bias(self.base_layer, y).to(g.dtype)
        if self.residual:
            return ((g - 1) * base_out + g * self._lora_out(xa, 0.0)).to(y.dtype)
        u = lora_down(xa, self.lora_A.weight, 0.0, self.training) * self.scaling
        return dora_delta(base_out, u, self.lora_B.weight, g).to(y.dtype)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = (m/n) ⊙ (W0 + s B A) − W0."""
        w = weight_out_in(base).to(self.lora_A.weight.dtype)
        new = self.magnitude_ratio().detach().unsqueeze(1) * (w + self.delta_out_in().detach())
        return {"weight": to_module_layout(base, new - w)}

    def changed_params(self, base: nn.Module) -> int:
        return logical_numel(base.weight)


class LoraEmbedding(Delta):
    """LoRA on ``nn.Embedding``: Δh = s · B A[:, ids] (A = 0, B normal at init, as in PEFT)."""

    site = "parallel"
    merges_into = ("weight",)
    reads_output = False

    def __init__(self, base: nn.Embedding, cfg: LoraConfig):
        super().__init__()
        self.r, self.scaling = cfg.r, cfg.scaling
        self.padding_idx = base.padding_idx
        self.lora_embedding_A = nn.Parameter(torch.zeros(cfg.r, base.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, cfg.r))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = s · B A one_hot(x): the embedding lookup of Aᵀ, then B."""
        after_a = F.embedding(x, self.lora_embedding_A.T, padding_idx=self.padding_idx)
        out = (after_a @ self.lora_embedding_B.T) * self.scaling
        return out if y is None else out.to(y.dtype)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔE = s · (B A)ᵀ, shape (vocab, dim) as the embedding's weight."""
        return {"weight": (self.scaling * (self.lora_embedding_B @ self.lora_embedding_A)).T.detach()}

    def rank(self) -> int:
        return self.r


class LoraConv2d(Delta):
    """LoRA on ``nn.Conv2d``: A is a conv with the base's kernel (in → r), B a 1×1 conv (r → out)."""

    site = "parallel"
    merges_into = ("weight",)

    def __init__(self, base: nn.Conv2d, cfg: LoraConfig):
        super().__init__()
        if base.groups != 1:
            raise ConfigError("lora on grouped Conv2d is not supported")
        self.r, self.scaling, self.p = cfg.r, cfg.scaling, float(cfg.dropout)
        self.lora_A = nn.Conv2d(base.in_channels, cfg.r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
        self.lora_B = nn.Conv2d(cfg.r, base.out_channels, 1, bias=False)
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / cfg.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = s · conv_B(conv_A(dropout(x))), conv_A with the base's kernel, conv_B 1×1."""
        x = F.dropout(x, self.p, self.training) if self.p else x
        return self.lora_B(self.lora_A(x)) * self.scaling

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW[o, i, k, l] = s · Σ_r B[o, r] A[r, i, k, l]."""
        B = self.lora_B.weight.flatten(1)  # (out, r)
        return {"weight": self.scaling * torch.einsum("or,rikl->oikl", B, self.lora_A.weight).detach()}

    def rank(self) -> int:
        return self.r
