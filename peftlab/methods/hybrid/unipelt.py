"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning"; seed 000 III-D1, seed 001 §11.3, seed 002 §3.4).

LoRA on W_q and W_v, prefix tuning, and a sequential adapter after the FFN, each behind its own
gate G = mean_t σ(W_g x_t + b_g) learned from the input of the sublayer it sits in:

    q, v:   h = W0 x + G_L(x) · s B A x                        x = the projection's input   (lora, gate)
    attn:   [G_k P_k; K], [G_v P_v; V] per layer              G from the layer's values   (prefix, gate)
    FFN:    h ← h + G_A(z) · (W_up σ(W_down h + b_down) + b_up)   z = the FFN output projection's input
                                                                                        (pfeiffer, gate)

``unipelt[...]`` is exactly the union ``lora[gate=true,...]+prefix[gate=true,...]+pfeiffer[gate=true,...]``:
:meth:`UnipeltConfig.parts` builds those three configs; the gates are an option of the parts
(``core/gate.py`` for LoRA and the adapter, ``methods/additive/prefix_gate.py`` for the prefix,
where the form implemented and what a closed prefix gate leaves are documented). Core places,
saves (``parts.<i>.`` keys, peftlab's own format: PEFT has no UniPELT) and refuses merging as for
that union. Options pass through: ``r``, ``alpha``, ``dropout`` to LoRA; ``length``,
``projection``, ``hidden``, ``init`` to the prefix; ``adapter_r`` (its ``r``) or
``reduction_factor``, ``activation`` to the adapter.

Defaults, after Mao et al. (and AdapterHub's UniPELT): LoRA r = 8 (α = 16, s = 2), prefix length 10
(without the reparameterization MLP, prefix tuning's ``tokens`` init: better on small models),
adapter bottleneck d/16 (48 on the 768-wide models of the paper, 2 on the 32-wide tiny test models).
Not identity at init: LoRA (B = 0) and the adapter (W_up = 0) add nothing whatever their gates, but
the prefix changes the outputs, as prefix tuning does. No mixed batches (a gated prefix does not
batch per row): a routed call raises NotImplementedError.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.core.config import AdapterConfig, HybridConfig
from peftlab.core.registry import register_method
from peftlab.core.requirements import KV_CACHE_MODEL
from peftlab.methods.additive.pfeiffer import PfeifferConfig
from peftlab.methods.hybrid.options import PrefixOptions
from peftlab.methods.reparam.lora import LoraConfig


@dataclass(kw_only=True)
class UnipeltConfig(PrefixOptions, HybridConfig):
    """Gated LoRA (``r``, ``alpha``, ``dropout``) + gated prefix (``length``, ``projection``,
    ``hidden``, ``init``) + gated adapter after the FFN (``adapter_r`` or ``reduction_factor``,
    ``activation``); defaults in the module docstring."""

    identity_at_init = False
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    length: int = 10
    adapter_r: int | None = None
    reduction_factor: float = 16
    activation: str = "relu"

    def parts(self) -> list[AdapterConfig]:
        """[lora, prefix, pfeiffer], each with ``gate=true``."""
        return [
            LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, gate=True, modules_to_save=self.modules_to_save),
            self.prefix_part(gate=True),
            PfeifferConfig(r=self.adapter_r, reduction_factor=self.reduction_factor, activation=self.activation,
                           gate=True),
        ]


register_method(
    "unipelt", UnipeltConfig, None, family="hybrid", sites=("parallel", "model", "output"), merges=False,
    per_row=False, example="unipelt[r=8,length=10,reduction_factor=16]", default_lr=1e-2, needs=(KV_CACHE_MODEL,),
)
