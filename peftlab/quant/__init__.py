"""Quantized base models: 4-bit NormalFloat (QLoRA) through bitsandbytes, and LoftQ.

    from peftlab.quant import quantize
    model = quantize(model, "nf4")                 # Linear layers -> bitsandbytes Linear4bit
    print(model.quantization_report)               # layers, memory before / after
    pm = peftlab.apply(model, "lora[r=8]")         # any method attaches with its usual hooks

    pm = peftlab.apply(float_model, "qlora[r=8,init=loftq]")   # quantize + LoRA (+ LoftQ) in one go

``nf4.py`` holds :func:`quantize` (the one place peftlab restructures a base, on the user's
request), ``qlora.py`` the ``qlora[...]`` config form. How deltas read and merge into 4-bit layers
lives in the core (``core/quantized.py``), so every method works on them without a subclass.
bitsandbytes is an optional dependency: ``pip install 'peftlab[quant]'``.
"""

from peftlab.quant.nf4 import QuantizationError, QuantReport, model_bytes, quantize
from peftlab.quant.qlora import QLoraConfig

__all__ = ["QLoraConfig", "QuantReport", "QuantizationError", "model_bytes", "quantize"]
