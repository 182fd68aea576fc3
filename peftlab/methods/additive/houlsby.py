"""Sequential bottleneck adapter (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
seed 001 §6.1, seed 000 III-A1, seed 002 §3.1.1).

One adapter after the attention output projection and one after the FFN output projection of every
block (before the residual connection and LayerNorm), output site:

    y ← y + W_up σ(W_down y + b_down) + b_up,     W_down ∈ R^{m×d}, W_up ∈ R^{d×m},  m = d / reduction_factor

W_up and b_up start at zero, so the adapted model is the base model at init. σ is ReLU, GELU or SiLU.
The adapter is nonlinear in y, so it cannot be folded into the base weights (``merge()`` refuses).
Hugging Face PEFT has no Houlsby adapter: files use our own keys, ``adapter_down.{weight,bias}`` and
``adapter_up.{weight,bias}`` under ``base_model.model.<module>``. ``adapterdrop=k`` leaves the lowest
k layers without adapters (``bottleneck.py``). The math and the mixed-batch path are shared with the
other bottleneck adapters in ``bottleneck.py``; pfeiffer is this method with the FFN targets only.

Not implemented: the optional training of the block's LayerNorms that the paper also does (combine
with a LayerNorm-tuning adapter for that).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftlab.core.delta import Delta
from peftlab.core.gate import GateOption, gated
from peftlab.core.layers import layer_info
from peftlab.core.registry import register_method
from peftlab.core.targeting import is_linear
from peftlab.methods.additive.bottleneck import (  # noqa: F401  (ACTIVATIONS, bottleneck_adapter: public names)
    ACTIVATIONS, LinearBottleneck, SequentialBottleneck, SizedBottleneckConfig, bottleneck_adapter,
    select_adapter_modules,
)

#: FFN-output projections of BERT, Llama, GPT-2, T5 and ViT (BERT's ``encoder.layer.N.output.dense``
#: is named by a regex so that the suffix ``output.dense`` does not also mean ``attention.output.dense``).
FFN_TARGETS = [
    r"re:(?:.*\.)?\d+\.output\.dense",  # BERT, RoBERTa (and ViT before transformers 5)
    "down_proj",  # Llama, Mistral, Qwen
    "mlp.fc2",  # ViT (transformers 5), CLIP, Phi
    "mlp.c_proj",  # GPT-2
    "DenseReluDense.wo",  # T5
]
#: Attention-output and FFN-output projections: every block gets exactly one adapter per sublayer.
DEFAULT_TARGETS = [
    "attention.output.dense",  # BERT, RoBERTa (and ViT before transformers 5): attention output
    "o_proj",  # Llama, Mistral, Qwen; ViT's o_proj (transformers 5)
    "attn.c_proj",  # GPT-2
    "SelfAttention.o", "EncDecAttention.o",  # T5
    *FFN_TARGETS,
]


@dataclass(kw_only=True)
class HoulsbyConfig(GateOption, SizedBottleneckConfig):
    """Bottleneck size ``r`` (if given) or ``d // reduction_factor``; activation relu | gelu | silu;
    ``adapterdrop`` = k: no adapter in the lowest k layers; ``gate=true``: the adapter's change
    weighted by a gate on the layer's input (UniPELT; ``core/gate.py``)."""


class HoulsbyAdapter(SequentialBottleneck, LinearBottleneck):
    """Output site: y ← y + up(σ(down(y))), up = 0 at init."""

    def __init__(self, base: nn.Module, cfg: SizedBottleneckConfig):
        d = layer_info(base).out_features
        super().__init__(d, cfg.bottleneck(d), d, cfg.activation)


def build_sequential(model: nn.Module, cfg: HoulsbyConfig, default: list[str]) -> dict[str, Delta]:
    """One :class:`HoulsbyAdapter` on each selected linear layer (``default`` targets unless
    ``cfg.targets``), AdapterDrop applied; gated with ``cfg.gate``."""
    modules = select_adapter_modules(model, cfg, default=default, accept=is_linear, what="Linear or Conv1D layer")
    return gated(model, {name: HoulsbyAdapter(module, cfg) for name, module in modules.items()}, cfg.gate)


def _build(model: nn.Module, cfg: HoulsbyConfig) -> dict[str, Delta]:
    return build_sequential(model, cfg, DEFAULT_TARGETS)


register_method(
    "houlsby", HoulsbyConfig, _build, family="additive", sites=("output",), merges=False, per_row=True,
    example="houlsby[reduction_factor=16,activation=relu]", default_lr=2e-3,
)
