"""``qlora[...]``: quantize the base to 4-bit NF4, then place LoRA on it (Dettmers et al. 2023).

    pm = peftlab.apply(model, "qlora[r=16,alpha=32,targets=all-linear]")
    pm = peftlab.apply(model, "qlora[r=16,alpha=32,init=loftq,loftq_iter=5]")   # LoftQ init

Why a config *form* and not a registered method: a builder must not modify the model (the registry
rule, ``core/registry.py``), and QLoRA's first step replaces the base's Linear layers. The form
(``core/config.BaseChangingConfig``) is what ``peftlab.apply`` hands the whole step to: it calls
:func:`peftlab.quant.quantize` (the user's explicit request to change the base) and then applies a
plain ``LoraConfig``. So the adapter *is* LoRA: ``pm.configs`` holds the LoRA config, its files are
PEFT's LORA files, and it loads with ``peftlab.load(quantize(fresh_model), directory)``.

With ``init=loftq`` the LoRA factors and the 4-bit weights are chosen together from the float
weights (``methods/reparam/lora/loftq.py``), which exist only here, before quantizing: LoftQ runs
on every targeted Linear layer, the layers are quantized from the matrices LoftQ chose (with
``loftq_iter=1``: the float weights themselves), and the factors are written into the placed deltas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.core.config import BaseChangingConfig, register_form
from peftlab.core.layers import weight_out_in
from peftlab.core.model import PeftModel, apply
from peftlab.core.quantized import roundtrip
from peftlab.core.targeting import is_linear, select_modules
from peftlab.methods.reparam.lora import DEFAULT_TARGETS, LoraConfig
from peftlab.methods.reparam.lora.loftq import LoftQFactors, loftq_factors
from peftlab.quant.nf4 import KINDS, _DTYPES, QuantizationError, quantizable, quantize


@dataclass(kw_only=True)
class QLoraConfig(LoraConfig, BaseChangingConfig):
    """LoRA's fields (``r``, ``alpha``, ``dropout``, ``rslora``, ``init`` incl. ``loftq`` and
    ``loftq_iter``, the targeting fields) and how the base is quantized first: ``quant_type``
    (nf4 | fp4), ``double_quant``, ``compute_dtype`` (None: each layer's own dtype; or bfloat16,
    float16, float32) and ``skip`` (modules kept in float besides the output heads)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None
    skip: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        self._check(self.quant_type in KINDS, "quant_type", f"one of {', '.join(KINDS)}")
        self._check(isinstance(self.double_quant, bool), "double_quant", "true or false")
        self._check(self.compute_dtype is None or self.compute_dtype in _DTYPES, "compute_dtype",
                    f"none or one of {', '.join(_DTYPES)}")
        if isinstance(self.skip, str):
            self.skip = [self.skip]

    def adapter_config(self) -> LoraConfig:
        """The plain LoRA config of the adapter this form places (what ``pm.configs`` holds)."""
        return LoraConfig(**{name: getattr(self, name) for name in LoraConfig.field_names()})

    def apply_to(self, model: nn.Module, adapter_name: str) -> PeftModel:
        """Quantize ``model`` (in place) and attach LoRA as ``adapter_name``; with ``init=loftq``,
        LoftQ's 4-bit weights and factors (module docstring)."""
        if isinstance(model, PeftModel):
            raise QuantizationError(
                "qlora quantizes the base model, so it is applied to a plain model: quantize first "
                "(peftlab.quant.quantize(model)) and add LoRA adapters with pm.add_adapter(name, 'lora[...]')")
        lora = self.adapter_config()
        quant: dict[str, Any] = dict(kind=self.quant_type, skip=self.skip, double_quant=self.double_quant,
                                     compute_dtype=self.compute_dtype)
        factors: dict[str, LoftQFactors] = {}
        if lora.init == "loftq":
            factors = self._loftq(model, lora)
            quant["sources"] = {name: f.source for name, f in factors.items()}
        quantize(model, **quant)
        pm = apply(model, lora, adapter_name)
        for name, delta in (pm.placed(adapter_name) or {}).items():
            if name in factors:  # every placed delta: _loftq covered exactly the layers LoRA targets
                delta.lora_A.weight.data.copy_(factors[name].A)
                delta.lora_B.weight.data.copy_(factors[name].B)
        return pm

    def _loftq(self, model: nn.Module, lora: LoraConfig) -> dict[str, LoftQFactors]:
        """LoftQ on each float layer LoRA will target (all of them must be quantized ones)."""
        targets = select_modules(model, lora, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
        quantized, _ = quantizable(model, self.skip)
        kept = [n for n in targets if n not in quantized]
        if kept:
            raise QuantizationError(f"qlora init=loftq: {kept[0]!r} is targeted but stays in float (an output head or "
                                    "skipped); LoftQ initialises LoRA on quantized layers only")
        out = {}
        for name, layer in targets.items():
            w = weight_out_in(layer)
            dtype = w.dtype  # quantize() stores the source in the layer's dtype: LoftQ's q_N does the same

            def q(m, dtype=dtype):
                return roundtrip(m.to(dtype), self.quant_type, double_quant=self.double_quant)

            out[name] = loftq_factors(w, lora.r, lora.scaling, lora.loftq_iter, quantize=q)
        return out


register_form("qlora", QLoraConfig)
