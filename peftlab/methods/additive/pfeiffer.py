"""Pfeiffer sequential adapter (Pfeiffer et al. 2021, "AdapterFusion"; seed 001 §6.1, seed 002 §3.1.1).

The Houlsby adapter after the FFN only: one adapter per block, output site on the FFN's output
projection (before the block's residual connection and its "Add & Norm", which the base then applies
to the adapted output, as Pfeiffer's configuration keeps the original LayerNorm after the adapter):

    h ← h + W_up σ(W_down h + b_down) + b_up,     W_up = 0, b_up = 0 at init

Same config fields, math, files (``adapter_down`` / ``adapter_up``) and mixed-batch path as houlsby
(``houlsby.py``, ``bottleneck.py``); only the default targets differ. Not mergeable (nonlinear in h).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftlab.core.delta import Delta
from peftlab.core.registry import register_method
from peftlab.methods.additive.houlsby import FFN_TARGETS, HoulsbyConfig, build_sequential


@dataclass(kw_only=True)
class PfeifferConfig(HoulsbyConfig):
    """As :class:`HoulsbyConfig`; the default targets are the FFN output projections only."""


def _build(model: nn.Module, cfg: PfeifferConfig) -> dict[str, Delta]:
    return build_sequential(model, cfg, FFN_TARGETS)


register_method(
    "pfeiffer", PfeifferConfig, _build, family="additive", sites=("output",), merges=False, per_row=True,
    example="pfeiffer[reduction_factor=16,activation=relu]", default_lr=5e-3,
)
