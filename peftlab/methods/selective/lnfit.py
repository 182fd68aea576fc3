"""LayerNorm tuning (LNFit): train only the normalization layers' affine parameters (seed 000 III-D2,
footnote; Zhao et al. 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM
Finetuning"; Hugging Face PEFT's ``LN_TUNING``).

A norm layer computes y = γ ⊙ n(x) + β over the last dimension (LayerNorm: n(x) = (x − μ)/σ;
RMSNorm, LlamaRMSNorm, T5LayerNorm: n(x) = x / rms(x), no β). LNFit trains γ and β, realised as
deltas (``tuned.py``: the base is never modified):

    y' = (γ0 + Δγ) ⊙ n(x) + β0 + Δβ = y + Δγ ⊙ n(x) + Δβ          Δγ = Δβ = 0 at init

For a layer that computes LayerNorm's or RMSNorm's formula (checked once on probes,
``norm_delta.norm_kind``), Δy is that norm with (Δγ, Δβ) as its parameters, which autograd runs
keeping only what the norm keeps (``norm_delta.py``). For any other norm class, n(x) is computed by
the layer's own forward with γ = 1 and β = 0; a norm whose output has a term free of γ, such as
Gemma's (1 + γ) ⊙ n(x), is detected once and that term subtracted. Merging writes γ0 + Δγ and
β0 + Δβ into the layer.

Norm layers are recognised by class name (``...LayerNorm``, ``...RMSNorm``, any ``...Norm`` but the
channel norms BatchNorm / GroupNorm / InstanceNorm) holding a weight-only (or weight and bias)
affine of the last dimension: a 1-d ``weight`` and no other parameters but a ``bias`` of its shape.

Files are PEFT's ``LN_TUNING`` format: the tuned values γ0 + Δγ, β0 + Δβ under the norm's own names
after PEFT's copy of the layer, ``base_model.model.<norm>.ln_tuning_layers.weight`` (``.bias``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.delta import Delta, broadcast_rows
from peftlab.core.peft_format import (
    exclude_to_peft,
    modules_to_save_from_peft,
    modules_to_save_to_peft,
    targets_from_peft,
    targets_to_peft,
)
from peftlab.core.registry import PeftFormat, Requirement, register_method
from peftlab.core.targeting import select_modules
from peftlab.methods.selective.norm_delta import NormKind, norm_kind, norm_with, normalized_by
from peftlab.methods.selective.tuned import TunedDelta, gathered

#: Norms over the channel dimension (dim 1), not the last one: not LNFit's layers.
_CHANNEL_NORMS = ("BatchNorm", "GroupNorm", "InstanceNorm", "LocalResponseNorm", "SyncBatchNorm")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a LayerNorm / RMSNorm-style layer (module docstring: class name ending
    in ``Norm``, not a channel norm; a 1-d ``weight``, optionally a ``bias`` of its shape, nothing else)."""
    name = type(module).__name__
    if not name.endswith("Norm") or any(c in name for c in _CHANNEL_NORMS):
        return False
    params = dict(module.named_parameters())
    weight, bias = params.pop("weight", None), params.pop("bias", None)
    return (weight is not None and weight.dim() == 1 and not params
            and (bias is None or bias.shape == weight.shape))


def call_with(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``module``'s own forward on ``x`` with some of its parameters replaced by ``params``; the
    module is not changed and its hooks do not run (a shallow copy holds the replacements)."""
    proxy = object.__new__(type(module))
    proxy.__dict__.update(module.__dict__)
    proxy.__dict__["_parameters"] = {**module._parameters, **params}
    return type(module).forward(proxy, x)


def _affine(module: nn.Module, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Replacement parameters: γ = ``weight`` and, if the layer has one, β = 0."""
    bias = getattr(module, "bias", None)
    return {"weight": weight} if bias is None else {"weight": weight, "bias": torch.zeros_like(bias)}


def normalized(module: nn.Module, x: torch.Tensor, offset: bool) -> torch.Tensor:
    """n(x) of a norm layer: its forward with γ = 1, β = 0, minus (if ``offset``) its output with
    γ = 0, β = 0 (the part free of γ, e.g. Gemma's n(x) in (1 + γ) ⊙ n(x))."""
    n = call_with(module, _affine(module, torch.ones_like(module.weight)), x)
    return n - call_with(module, _affine(module, torch.zeros_like(module.weight)), x) if offset else n


def lnfit_delta(n: torch.Tensor, d_weight: torch.Tensor, d_bias: torch.Tensor | None) -> torch.Tensor:
    """Δy = Δγ ⊙ n(x) + Δβ (the change of y = γ ⊙ n(x) + β when γ, β move by Δγ, Δβ)."""
    out = d_weight * n
    return out + d_bias if d_bias is not None else out


class NormDelta(TunedDelta):
    """Parallel site on a norm layer: Δy = Δγ ⊙ n(x) + Δβ, merged into its ``weight`` (and ``bias``)."""

    file_prefix = "ln_tuning_layers."

    def __init__(self, base: nn.Module):
        super().__init__()
        self.__dict__["base_layer"] = base  # a reference, not a submodule
        self._tune(base, ("weight", "bias") if getattr(base, "bias", None) is not None else ("weight",))
        self.offset = False  # is there a term free of γ? (probed once, on a random input)
        #: Storage and version of each tuned base tensor when P0 was copied (``_plus_delta``).
        self._snapshot_of = {n: (getattr(base, n).data_ptr(), getattr(base, n)._version) for n in self.tuned}
        #: (kind, ε) when the layer is a known norm formula (``norm_delta.py``), computed as that norm.
        self.formula: tuple[NormKind, float] | None = None
        if base.weight.device.type != "meta":
            probe = torch.randn(2, base.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(base.weight)
            with torch.no_grad():
                self.offset = bool(call_with(base, _affine(base, torch.zeros_like(base.weight)), probe).ne(0).any())
            if not self.offset:
                self.formula = norm_kind(base, lambda p: normalized(base, p, False))

    def _n(self, x: torch.Tensor) -> torch.Tensor:
        if self.formula is not None and x.dtype == self.tuned_weight.dtype:
            return normalized_by(self.formula[0], x, self.formula[1])
        return normalized(self.base_layer, x, self.offset).to(self.tuned_weight.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δy = Δγ ⊙ n(x) + Δβ, in y's dtype; for a known norm formula and x in the deltas' dtype, that
        norm with (Δγ, Δβ) as its parameters (``norm_delta.py``: no full-width tensor kept for backward)."""
        d_weight, d_bias = self.delta_of("weight"), self.delta_of("bias") if "bias" in self.tuned else None
        if self.formula is not None and x.dtype == d_weight.dtype:
            out = norm_with(self.formula[0], x, d_weight, d_bias, self.formula[1])
        else:
            out = lnfit_delta(self._n(x), d_weight, d_bias)
        return out.to(x.dtype if y is None else y.dtype)

    def plus(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + Δy: for a known norm formula with x and the layer's γ in the deltas' dtype, the norm once
        with (γ + Δγ, β + Δβ), γ and β the layer's current values (y, the base's own output, is
        dropped with its autograd graph: one norm's backward, not two); else y + Δy."""
        base = self.base_layer
        if self.formula is None or not x.dtype == base.weight.dtype == self.tuned_weight.dtype:
            return super().plus(x, y)
        bias = self._plus_delta("bias") if "bias" in self.tuned else None
        return norm_with(self.formula[0], x, self._plus_delta("weight"), bias, self.formula[1])

    def _plus_delta(self, name: str) -> torch.Tensor:
        """The layer's tensor ``name`` plus its delta: the tuned tensor P' itself while the layer holds
        the very tensor P0 was copied from, unchanged since (same storage, same version counter; no
        merge or load in between), else P + (P' − P0)."""
        current = getattr(self.base_layer, name)
        if self._snapshot_of.get(name) == (current.data_ptr(), current._version):
            return getattr(self, f"tuned_{name}")
        return current + self.delta_of(name)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Mixed batch: n(x) once, then row i gets Δγ, Δβ of its slot (one gather each; −1: zeros)."""
        present = [d for d in deltas if d is not None]
        if not all(isinstance(d, NormDelta) for d in present):
            return None
        n = present[0]._n(x)
        out = broadcast_rows(gathered(deltas, "weight", slot), n) * n
        if any("bias" in d.tuned for d in present):  # type: ignore[union-attr]
            out = out + broadcast_rows(gathered(deltas, "bias", slot), n)
        return out.to(y.dtype)


@dataclass(kw_only=True)
class LNFitConfig(AdapterConfig):
    """Targets default to every norm layer (``is_norm``); explicit targets keep only norm layers."""

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """PEFT's ``LNTuningConfig`` fields: the norms placed (exact names), or without a placement the
        targets (PEFT copies *any* module it matches, so default targets cannot be written then)."""
        norms = sorted(n for n, d in (placed or {}).items() if isinstance(d, NormDelta))
        try:
            if placed is not None:
                target_modules, exclude = norms, None
            elif self.targets is None or self.module_types is not None:
                raise ConfigError("targets")
            else:
                target_modules = targets_to_peft(self.targets, self.layers, layers_field=False)
                exclude = exclude_to_peft(self.exclude)
        except ConfigError:
            return {"peft_type": "PEFTLAB"}
        return {
            "peft_type": "LN_TUNING", "target_modules": target_modules, "exclude_modules": exclude,
            "modules_to_save": modules_to_save_to_peft(self.modules_to_save, placed),
            "task_type": None, "inference_mode": True, "base_model_name_or_path": None, "revision": None,
        }


def _config_from_peft(d: dict[str, Any]) -> LNFitConfig:
    """Our config from PEFT's LN_TUNING fields (PEFT's default targets per architecture are names of
    norm layers; PEFT's file always lists what it targeted)."""
    return LNFitConfig(targets=targets_from_peft(d.get("target_modules")),
                       exclude=targets_from_peft(d.get("exclude_modules")),
                       modules_to_save=modules_to_save_from_peft(d))


def _build(model: nn.Module, cfg: LNFitConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=["re:.*"], accept=is_norm,
                             what="LayerNorm / RMSNorm layer (a 1-d weight over the last dimension)")
    return {name: NormDelta(module) for name, module in modules.items()}


HAS_NORMS = Requirement(
    what="LayerNorm or RMSNorm layers",
    met=lambda model: any(is_norm(m) for m in model.modules()),
    hint="Use bitfit (biases) or lora instead.",
)

register_method(
    "lnfit", LNFitConfig, _build, family="selective", sites=("parallel",), merges=True, per_row=True,
    example="lnfit[layers=1]", default_lr=1e-2, needs=(HAS_NORMS,),
    peft=PeftFormat("LN_TUNING", read=_config_from_peft, write=LNFitConfig.to_peft),
)
