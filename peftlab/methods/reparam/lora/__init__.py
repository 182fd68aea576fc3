"""The LoRA family: LoRA, rsLoRA, DoRA, LoRA-FA, with gaussian / kaiming / PiSSA / OLoRA inits.

LoRA (Hu et al. 2021; seed 002 eq. 12):     h = W0 x + s · B A x,   A ∈ R^{r×in}, B ∈ R^{out×r}, B = 0
    s = α / r, or α / √r with rsLoRA (Kalajdzievski 2023).
DoRA (Liu et al. 2024; seed 002 eq. 17-18):  W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row,   m₀ = ‖W0‖_row
    computed as  h = W0 x + (m/n − 1) ⊙ W0 x + (m/n) ⊙ s B A x  with n = ‖W0 + s B A‖_row detached.
LoRA-FA (Zhang et al. 2023): A frozen (orthogonal random rows), only B trained; A's input is never
    kept for backward, which is where its memory saving comes from.
LoftQ (Li et al. 2023): on a 4-bit base, A, B absorb the quantization error (``loftq.py``; ``qlora[init=loftq]``).
PiSSA / OLoRA: A, B start from the top-r SVD (resp. QR) factors of W0. Hugging Face PEFT overwrites W0
    with the residual W0 − s B₀A₀; we never touch the base (DESIGN.md principle 1) and subtract the
    frozen initial product instead: h = W0 x + s (B A − B₀ A₀) x. The function is the same, so files
    are interchangeable with PEFT (B₀A₀ is recomputed from W0 on load, as PEFT does).

Layers: ``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding`` and ``nn.Conv2d`` (DoRA: the linear ones).

The package, by concern:
    config.py      LoraConfig, DoraConfig, LoraFaConfig, INITS, DEFAULT_TARGETS, the scale
    peft_file.py   PEFT's ``adapter_config.json`` fields, both ways
    functional.py  the math as pure functions (dropout mask, A · dropout(x), Δh, PiSSA/OLoRA factors)
    loftq.py       LoftQ's alternation of quantization and SVD (the init of qlora[init=loftq])
    deltas.py      LoraLinear, DoraLinear, LoraEmbedding, LoraConv2d
    routing.py     mixed batches: gathered / stacked weights, cached per routing
    __init__.py    the builder and the three registrations
"""

from __future__ import annotations

from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.delta import Delta
from peftlab.core.quantized import is_4bit
from peftlab.core.gate import gated
from peftlab.core.layers import is_adaptable_layer, layer_info
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS, INITS, DoraConfig, LoraConfig, LoraFaConfig
from peftlab.methods.reparam.lora.deltas import DoraLinear, LoraConv2d, LoraEmbedding, LoraLinear
from peftlab.methods.reparam.lora.functional import _DropoutThenLinear, keep_mask, lora_delta, lora_down
from peftlab.methods.reparam.lora.peft_file import config_from_peft

__all__ = [
    "DEFAULT_TARGETS", "INITS", "LoraConfig", "DoraConfig", "LoraFaConfig",
    "LoraLinear", "DoraLinear", "LoraEmbedding", "LoraConv2d",
    "keep_mask", "lora_down", "lora_delta", "_DropoutThenLinear",
]


def _build(model: nn.Module, cfg: LoraConfig) -> dict[str, Delta]:
    if cfg.method == "dora":
        accept, what = is_linear, "Linear or Conv1D layer (DoRA)"
    elif cfg.init in ("pissa", "olora", "loftq") or cfg.method == "lora_fa":
        accept, what = is_linear, f"Linear or Conv1D layer ({cfg.method}, init={cfg.init})"
    else:
        accept, what = is_adaptable_layer, "Linear, Conv1D, Embedding or Conv2d layer"
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=accept, what=what)
    if cfg.init == "loftq":
        _check_loftq(cfg, modules)
    placed: dict[str, Delta] = {}
    for name, module in modules.items():
        kind = layer_info(module).kind
        if cfg.method == "dora":
            placed[name] = DoraLinear(module, cfg)
        elif kind == "embedding":
            placed[name] = LoraEmbedding(module, cfg)
        elif kind == "conv2d":
            placed[name] = LoraConv2d(module, cfg)
        else:
            placed[name] = LoraLinear(module, cfg)
    return gated(model, placed, cfg.gate)


def _check_loftq(cfg: LoraConfig, modules: dict[str, nn.Module]) -> None:
    """``init=loftq`` builds plain LoRA deltas (B = 0) on 4-bit layers, whose LoftQ factors are then
    written by ``qlora[init=loftq]`` (it has the float weights) or loaded from a file (config.py)."""
    if cfg.method != "lora":
        raise ConfigError(f"{cfg.method}: init=loftq is a LoRA init (qlora[init=loftq]); {cfg.method} cannot use it")
    floats = [n for n, m in modules.items() if not is_4bit(m)]
    if floats:
        raise ConfigError(
            f"lora init=loftq: {floats[0]!r} is a float layer. LoftQ chooses a layer's 4-bit weights and its LoRA "
            "factors together from the float weights: use peftlab.apply(float_model, 'qlora[init=loftq,...]'), "
            "which quantizes the model as it initialises the adapter")


# PEFT writes DoRA and LoRA-FA's files as LORA (DoRA with use_dora=true): lora's reader turns them
# back into DoraConfig / LoraConfig, so the variants only write.
register_method(
    "lora", LoraConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="lora[r=8,alpha=16,targets=q_proj|v_proj]", default_lr=3e-3,
    peft=PeftFormat("LORA", read=config_from_peft, write=LoraConfig.to_peft),
)
register_method(
    "dora", DoraConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="dora[r=8,alpha=16]", default_lr=3e-3,
    peft=PeftFormat("LORA", read=None, write=DoraConfig.to_peft),
)
register_method(
    "lora_fa", LoraFaConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="lora_fa[r=8,alpha=16,init=gaussian]", default_lr=3e-3,
    peft=PeftFormat("LORA", read=None, write=LoraFaConfig.to_peft),
)
