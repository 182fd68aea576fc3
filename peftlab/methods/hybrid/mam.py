"""MAM adapter, "Mix-And-Match" (He et al. 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning"; seed 000 III-D1, seed 001 §11.2, seed 002 §3.4).

Prefix tuning with a small length in every self-attention, and a scaled parallel adapter beside
every FFN:

    head_l(x) = softmax( Q [P_k^l; K]ᵀ / √d + M ) [P_v^l; V]                      (prefix, ``prefix.py``)
    h ← FFN(x) + s · (W_up σ(W_down x + b_down) + b_up),   W_up = 0, b_up = 0       (``par_adapter.py``)

``mam[...]`` is exactly the union ``prefix[length=L,...]+par_adapter[site=ffn,r=R,scale=S,...]``:
:meth:`MamConfig.parts` builds those two configs and core places, saves (``parts.0.`` / ``parts.1.``
keys, peftlab's own format: PEFT has no MAM) and refuses merging as for that union; nothing of the
parts is copied here. Options pass through: ``length``, ``projection``, ``hidden``, ``init`` to the
prefix; ``r`` or ``reduction_factor``, ``scale``, ``activation`` to the parallel adapter.

Defaults. He et al. use l = 30, s = 4 and a bottleneck of 512 at the FFN of 1024-wide models
(BART-large, mBART). Here: ``length=30``, ``scale=4``, and the bottleneck as their ratio,
``reduction_factor=2`` (d/2: 512 on their models, 288 on SmolLM2-135M, 16 on the 32-wide tiny test
models); ``r=512`` gives their absolute size. The prefix keeps prefix tuning's own defaults (no MLP,
``tokens`` init: the keys/values of random vocabulary tokens). Not identity at init (a prefix takes
softmax mass); mixed batches go per row (both parts batch per row).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.core.config import AdapterConfig, HybridConfig
from peftlab.core.registry import register_method
from peftlab.core.requirements import KV_CACHE_MODEL
from peftlab.methods.additive.par_adapter import ParAdapterConfig
from peftlab.methods.hybrid.options import PrefixOptions


@dataclass(kw_only=True)
class MamConfig(PrefixOptions, HybridConfig):
    """Prefix (``length``, ``projection``, ``hidden``, ``init``) + scaled parallel adapter at the FFN
    (``r`` or ``reduction_factor``, ``scale``, ``activation``); defaults in the module docstring."""

    identity_at_init = False
    length: int = 30
    r: int | None = None
    reduction_factor: float = 2
    scale: float = 4.0
    activation: str = "relu"

    def parts(self) -> list[AdapterConfig]:
        """[prefix, par_adapter at the FFN] with this config's values."""
        return [
            self.prefix_part(modules_to_save=self.modules_to_save),
            ParAdapterConfig(site="ffn", r=self.r, reduction_factor=self.reduction_factor, scale=self.scale,
                             activation=self.activation),
        ]


register_method(
    "mam", MamConfig, None, family="hybrid", sites=("model", "parallel", "input"), merges=False, per_row=True,
    example="mam[length=30,reduction_factor=2,scale=4]", default_lr=1e-3, needs=(KV_CACHE_MODEL,),
)
# default_lr 1e-3, not the 1e-2 of prefix tuning: the d/2-wide adapter at scale 4 makes large
# steps; on MiniLM SST-2 (80 steps x 16) lr 1e-2 and 3e-3 leave MAM predicting one class (52.7%)
# and 1e-3 reaches 74.6%, LoRA's level (the same happens to par_adapter[reduction_factor=2] at 1e-2).
