"""Parallel / scaled parallel adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning"; seed 000 III-D, seed 001 §11.2, seed 002 §3.4).

A bottleneck beside a whole sublayer (the FFN by default, or the attention block), reading the
sublayer's input x and added to its output, before the block's residual connection:

    h ← sublayer(x) + s · (W_up σ(W_down x + b_down) + b_up),     W_up = 0, b_up = 0 at init

``scale`` = s (4, He et al.'s choice for the FFN), ``site`` = ffn | attn, bottleneck ``r`` or
``d // reduction_factor``, ``activation``, ``adapterdrop`` (``bottleneck.py``). Not mergeable
(nonlinear in x). Files: ``adapter_down.{weight,bias}``, ``adapter_up.{weight,bias}`` (our own format;
PEFT has no parallel adapter).

Where it sits, per architecture (the hooked module's input is the sublayer's input, its output is
what the block adds to the residual stream):

=========  =================================================  ==============================================
model      site=ffn                                           site=attn
=========  =================================================  ==============================================
Llama      ``mlp`` (input: post-attention RMSNorm output)      ``self_attn`` (its ``hidden_states``)
GPT-2      ``mlp`` (input: ``ln_2`` output)                    ``attn``
T5         ``DenseReluDense`` (input: the FFN's layer norm)    ``SelfAttention``, ``EncDecAttention`` (query side)
ViT (5.x)  ``mlp``                                             ``attention``
BERT       ``intermediate`` + ``output.dense``                 ``attention`` + ``attention.output.dense``
=========  =================================================  ==============================================

BERT's ``output`` (and ``attention.output``) modules apply the residual connection and LayerNorm
themselves, so no single module has the sublayer's input as input and the added value as output.
There the adapter is a pair: a parameter-free :class:`InputTap` (input site) on the first module
keeps the sublayer's input x, and the :class:`ParallelAdapter` on the dense projection adds
s·branch(x) to its output, before the residual and LayerNorm (ViT under transformers 4.x the same).
The tap holds x from its module's call until the dense projection's call of the same forward: on
these architectures, two threads must not run forwards of one model object at the same time.

Only the outermost match is adapted (ViT 4.x's ``attention.attention`` lies inside its paired
``attention``). Explicit ``targets`` name the hooked modules directly (no pairs): each gets an
adapter from its input to its output; the dimensions are the first and last linear layer inside it
(a Linear target: its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from peftlab.core.delta import Delta
from peftlab.core.layers import layer_info
from peftlab.core.registry import register_method
from peftlab.core.targeting import entry_matches, is_linear
from peftlab.methods.additive.bottleneck import (
    LinearBottleneck, SizedBottleneckConfig, bottleneck_branch, routed_branch, select_adapter_modules,
)

#: Whole-sublayer modules, per site (table in the module docstring).
DIRECT = {
    "ffn": ["mlp", "DenseReluDense"],
    "attn": ["self_attn", "attn", "attention", "SelfAttention", "EncDecAttention"],
}
#: (module whose input is the sublayer input, its block-relative dense projection whose output is added).
PAIRS = {"ffn": [("intermediate", "output.dense")], "attn": [("attention", "attention.output.dense")]}
SITES = tuple(DIRECT)


@dataclass(kw_only=True)
class ParAdapterConfig(SizedBottleneckConfig):
    """``scale`` s (default 4), ``site`` ffn | attn, plus the bottleneck fields (``r`` or
    ``reduction_factor``, ``activation``, ``adapterdrop``)."""

    scale: float = 4.0
    site: str = "ffn"

    def validate(self) -> None:
        super().validate()
        s = self.scale
        self._check(isinstance(s, (int, float)) and not isinstance(s, bool) and s != 0 and s == s, "scale",
                    "a nonzero number")
        self._check(self.site in SITES, "site", f"one of {', '.join(SITES)}")


def parallel_adapter(x: torch.Tensor, y: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor,
                     w_up: torch.Tensor, b_up: torch.Tensor, act, scale: float) -> torch.Tensor:
    """The scaled parallel adapter y + s · (W_up σ(W_down x + b_down) + b_up), y = sublayer(x)
    (He et al. 2022, eq. of the "scaled PA")."""
    return y + scale * bottleneck_branch(x, w_down, b_down, w_up, b_up, act)


class InputTap(Delta):
    """Input site, no parameters: keeps its module's input (the sublayer input x) for the
    :class:`ParallelAdapter` of the same pair, and passes it on unchanged."""

    site = "input"

    def __init__(self) -> None:
        super().__init__()
        self.x: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x, unchanged (kept for the pair's adapter)."""
        self.x = x
        return x

    def take(self) -> torch.Tensor:
        """The kept input, released (it is used once per forward)."""
        x, self.x = self.x, None
        if x is None:
            raise RuntimeError("par_adapter: the sublayer's input was not seen before its output projection ran "
                               "(the tapped module must run first in the same forward)")
        return x

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Mixed batch: every tap keeps the whole batch (its adapter gathers its own rows)."""
        for d in deltas:
            if d is not None:
                d(x)
        return x


class ParallelAdapter(LinearBottleneck):
    """Parallel site: Δ = s · branch(x), x the sublayer input (the hooked module's input, or the
    pair's tap)."""

    site = "parallel"

    def __init__(self, d_in: int, d_out: int, cfg: ParAdapterConfig, tap: InputTap | None = None):
        super().__init__(d_in, cfg.bottleneck(d_in), d_out, cfg.activation)
        self.scale = float(cfg.scale)
        self.__dict__["tap"] = tap  # not a submodule: the tap is placed (and saved) on its own module

    def source(self, x: torch.Tensor) -> torch.Tensor:
        """The sublayer input: the tap's, for a pair, else the hooked module's own input."""
        tap = self.__dict__["tap"]
        return x if tap is None else tap.take()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """s · (W_up σ(W_down x + b_down) + b_up), in y's dtype."""
        assert y is not None
        src = self.source(x)
        if src.shape[0] != y.shape[0]:
            raise RuntimeError("par_adapter: a tapped sublayer input cannot be split into sub-batches")
        return (self.scale * self.branch(src)).to(y.dtype)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Mixed batch: row i gets s_k · branch_k(x_i), k = slot[i], as gathered batched matmuls."""
        present = [d for d in deltas if d is not None]
        if y is None or not all(isinstance(d, ParallelAdapter) for d in present):
            return None
        sources = [d.source(x) for d in present]  # type: ignore[union-attr]
        scales = [d.scale if d is not None else 0.0 for d in deltas]  # type: ignore[union-attr]
        return routed_branch(deltas, slot, sources[0], scales).to(y.dtype)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, tapped={self.__dict__['tap'] is not None}"


def io_dims(module: nn.Module) -> tuple[int, int] | None:
    """(input, output) features of a hooked module: a linear layer's own, else those of the first and
    last linear layer inside it (None when it has none)."""
    if is_linear(module):
        info = layer_info(module)
        return info.in_features, info.out_features
    inner = [m for m in module.modules() if is_linear(m)]
    if not inner:
        return None
    return layer_info(inner[0]).in_features, layer_info(inner[-1]).out_features


def _pairs(model: nn.Module, site: str) -> dict[str, str]:
    """{dense projection: tapped module} for the architectures whose sublayer needs a pair."""
    modules = dict(model.named_modules())
    found = {}
    for name in modules:
        for tapped, dense in PAIRS[site]:
            if name and entry_matches(tapped, name):
                add = name[: len(name) - len(tapped)] + dense
                if add in modules and is_linear(modules[add]):
                    found[add] = name
    return found


def _build(model: nn.Module, cfg: ParAdapterConfig) -> dict[str, Delta]:
    pairs = _pairs(model, cfg.site) if cfg.targets is None else {}
    modules = dict(model.named_modules())
    selected = select_adapter_modules(
        model, cfg, default=DIRECT[cfg.site] + [f"re:{n.replace('.', '[.]')}" for n in pairs],
        accept=lambda m: io_dims(m) is not None, what="module with a linear layer",
    )
    taps = set(pairs.values())
    outer = taps | {n for n in selected if n not in pairs}
    placement: dict[str, Delta] = {}
    for name, module in selected.items():
        if name in taps:  # a tapped module (BERT's "attention"): its pair adapts it
            continue
        if name not in pairs and any(name.startswith(o + ".") for o in outer):
            continue  # inside a hooked sublayer (ViT 4.x's attention.attention): the outermost one only
        if name in pairs:
            tap = placement[pairs[name]] = InputTap()
            d_in = io_dims(modules[pairs[name]])[0]  # type: ignore[index]
            placement[name] = ParallelAdapter(d_in, layer_info(module).out_features, cfg, tap)
        else:
            d_in, d_out = io_dims(module)  # type: ignore[misc]
            placement[name] = ParallelAdapter(d_in, d_out, cfg)
    return placement


register_method(
    "par_adapter", ParAdapterConfig, _build, family="additive", sites=("parallel", "input"), merges=False,
    per_row=True, example="par_adapter[r=8,scale=4,site=ffn]", default_lr=5e-3,
)
