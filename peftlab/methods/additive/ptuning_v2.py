"""P-tuning v2 / deep prompt tuning (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable
to Fine-tuning Universally Across Scales and Tasks"; seed 002 §3.1.2).

Prefix tuning without the reparameterization MLP: every self-attention layer l gets ``length``
trainable key and value rows, trained directly,

    head_l(x) = softmax( Q [P_k^l; K]ᵀ / √d + M ) [P_v^l; V]

which is ``prefix`` with ``projection=false``: the same config fields, delta, cache handling,
generation, mixed batches and files (``prefix.py``), registered under its own name. Hugging Face
PEFT has no type of its own for it: it writes ``PREFIX_TUNING`` with ``prefix_projection: false``,
and so do we (write only: PEFT's ``PREFIX_TUNING`` files are read by ``prefix``, which computes the
same function; our own ``peftlab_config.json`` keeps the name).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.requirements import KV_CACHE_MODEL
from peftlab.methods.additive.prefix import PrefixConfig, _build


@dataclass(kw_only=True)
class PTuningV2Config(PrefixConfig):
    """Deep prompts: :class:`~peftlab.methods.additive.prefix.PrefixConfig` with ``projection`` false
    (init ``tokens`` by default: the keys and values the model computes for random vocabulary tokens)."""

    def validate(self) -> None:
        super().validate()
        self._check(self.projection is False, "projection",
                    "false: P-tuning v2 trains the prefix directly (use prefix[projection=true] for the MLP)")


register_method(
    "ptuning_v2", PTuningV2Config, _build, family="additive", sites=("model",), merges=False, per_row=True,
    example="ptuning_v2[length=10,init=random]", default_lr=3e-2,
    peft=PeftFormat("PREFIX_TUNING", read=None, write=PTuningV2Config.to_peft), needs=(KV_CACHE_MODEL,),
)
