"""LoRA-family configs and their options: rank, scale, dropout, init (LoRA, DoRA, LoRA-FA).

The scale is s = α / r, or α / √r with rsLoRA (Kalajdzievski 2023). ``init`` picks how A and B start:
``kaiming`` (PEFT's default) or ``gaussian`` (A random, B = 0), or ``pissa`` / ``olora`` (the top-r
SVD, resp. QR, factors of W0; see ``functional.principal_factors``), or ``loftq`` (LoftQ, on a 4-bit
base: A, B absorb the quantization error, ``loftq.py``). The PEFT file format of these configs is in
``peft_file.py``.

``init=loftq`` needs the float weights, which exist only before quantization: ``peftlab.apply(model,
"qlora[init=loftq,loftq_iter=...]")`` (``peftlab.quant``) computes the factors while it quantizes the
float model, and a saved LoftQ adapter carries them. Built by itself (loading a file onto a quantized
base, or ``lora[init=loftq]`` on an already quantized one) a LoftQ delta starts as plain LoRA (B = 0),
for its factors to be loaded; on a float layer it is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from peftlab.core.config import AdapterConfig
from peftlab.core.gate import GateOption

#: Query and value projections of the common architectures (Llama, BERT, GPT-2, T5, ViT).
DEFAULT_TARGETS = ["q_proj", "v_proj", "query", "value", "c_attn", "q", "v"]
INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")


@dataclass(kw_only=True)
class LoraConfig(GateOption, AdapterConfig):
    """LoRA: rank ``r``, scale ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``), input dropout;
    ``gate=true``: Δh weighted by a gate on the layer's input (UniPELT; ``core/gate.py``, no merge)."""

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    #: LoftQ's alternating steps (PEFT's ``LoftQConfig.loftq_iter``); read only with ``init=loftq``.
    loftq_iter: int = 1

    def validate(self) -> None:
        self._check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", "a positive int")
        self._check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", "a positive number")
        self._check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        self._check(isinstance(self.rslora, bool), "rslora", "true or false")
        self._check(self.init in INITS, "init", f"one of {', '.join(INITS)}")
        self._check(isinstance(self.loftq_iter, int) and not isinstance(self.loftq_iter, bool) and self.loftq_iter >= 1,
                    "loftq_iter", "an int >= 1")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``LoraConfig`` fields for this config (see ``peft_file.config_to_peft``)."""
        # Imported here: the file format reads these config classes, and the deltas of ``placed``.
        from peftlab.methods.reparam.lora.peft_file import config_to_peft

        if self.gate:  # PEFT has no gated LoRA
            return {"peft_type": "PEFTLAB"}
        return config_to_peft(self, placed)


@dataclass(kw_only=True)
class DoraConfig(LoraConfig):
    """DoRA: LoRA on the direction, plus a trainable magnitude per output row."""


@dataclass(kw_only=True)
class LoraFaConfig(LoraConfig):
    """LoRA-FA: A frozen at a random orthogonal init, only B is trained."""

    def validate(self) -> None:
        super().validate()
        self._check(self.init in ("kaiming", "gaussian"), "init", "kaiming or gaussian (A is frozen)")
