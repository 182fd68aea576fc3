"""BitFit: fine-tune only the bias terms (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models"; seed 001 §9.1, seed 000 III-B1, seed 002 §3.2).

Selection site, realised without touching the base (DESIGN.md principle 1) as a delta over each
existing bias, so that several BitFit adapters can coexist and unloading is exact:

    y = W x + b0 + Δb          (Linear, GPT-2 Conv1D, ConvNd: Δb per output channel)
    y = γ ⊙ norm(x) + β0 + Δβ   (LayerNorm, GroupNorm, BatchNorm: the shift is a bias too)

Δb = 0 at init; merging writes b0 + Δb into ``bias``. Every module of those kinds that has a bias is
targeted by default (including the LayerNorms, as in the paper, and the task head's bias).

Files hold only the biases, as their *tuned* values b0 + Δb under the base model's own parameter
names (``base_model.model.<module>.bias``: strip the prefix and the tensors load into the base model
with ``load_state_dict(strict=False)``). The trainable tensor is a copy b' of the bias and Δb = b' − b0,
b0 a snapshot of the base bias taken when the adapter is created, so saving while merged is still
correct (the logic shared with the other selective methods is in ``tuned.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from peftlab.core.config import AdapterConfig
from peftlab.core.delta import Delta
from peftlab.core.registry import Requirement, register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.methods.selective.tuned import TunedDelta, gathered

#: Layers whose bias is a plain additive term of the output, channel in the last dimension.
_TRAILING = (nn.LayerNorm, nn.Linear)
#: Layers whose bias is added per channel along dimension 1.
_CHANNEL = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def _bias_layout(module: nn.Module) -> str | None:
    """'trailing' or 'channel' for a supported module that has a bias parameter, else None."""
    if not isinstance(getattr(module, "bias", None), nn.Parameter):
        return None
    if isinstance(module, _TRAILING) or is_linear(module):
        return "trailing"
    if isinstance(module, _CHANNEL):
        return "channel"
    return None


@dataclass(kw_only=True)
class BitFitConfig(AdapterConfig):
    """Targets default to every Linear/Conv1D/ConvNd/LayerNorm/GroupNorm/BatchNorm that has a bias."""



def bias_delta_view(db: torch.Tensor, layout: str, ndim: int) -> torch.Tensor:
    """Δb shaped to broadcast against one row (an output without its batch dimension) of ``ndim`` dims."""
    if layout == "channel":
        return db.reshape(db.shape[0], *([1] * max(0, ndim - 2)))
    return db.reshape(*([1] * max(0, ndim - 1 - db.dim())), *db.shape)


class BiasDelta(TunedDelta):
    """Parallel site: y ← y + Δb (Δb = 0 at init), merged into the base's ``bias`` (``tuned.py``)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        layout = _bias_layout(base)
        assert layout is not None
        self.layout = layout
        self._tune(base, ("bias",))

    @property
    def delta_bias(self) -> torch.Tensor:
        """Δb = b' − b0."""
        return self.delta_of("bias")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δb broadcast over y's shape (the hook adds it: y + Δb)."""
        assert y is not None
        return bias_delta_view(self.delta_bias, self.layout, y.dim()).to(y.dtype).expand_as(y)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Mixed batch as one gather: row i gets Δb of its slot (slot −1: zeros)."""
        present = [d for d in deltas if d is not None]
        if not present or not all(isinstance(d, BiasDelta) for d in present):
            return None
        rows = gathered(deltas, "bias", slot)  # (batch, *bias_shape)
        view = bias_delta_view(rows[0], present[0].layout, y.dim()).shape
        return rows.reshape(rows.shape[0], *view).to(y.dtype)


def _build(model: nn.Module, cfg: BitFitConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=["re:.*"], accept=lambda m: _bias_layout(m) is not None,
                             what="layer with a bias (Linear, Conv1D, Conv, LayerNorm, GroupNorm, BatchNorm)")
    return {name: BiasDelta(module) for name, module in modules.items()}


HAS_BIASES = Requirement(
    what="layers with a bias (Linear, Conv1D, Conv, LayerNorm, GroupNorm or BatchNorm)",
    met=lambda model: any(_bias_layout(m) for m in model.modules()),
    hint="Llama- and T5-style models use bias-free layers and RMSNorm, so BitFit has nothing to train there; "
         "use another method (e.g. ia3 or lora).",
)

register_method(
    "bitfit", BitFitConfig, _build, family="selective", sites=("parallel",), merges=True, per_row=True,
    example="bitfit[module_types=Linear|LayerNorm]", default_lr=1e-2, needs=(HAS_BIASES,),
)
