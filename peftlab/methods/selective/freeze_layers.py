"""Layer freezing: train the top k blocks (or named blocks) fully, freeze the rest (seed 001 §3.2,
seed 003 §3.3 "FL"; Lee et al. 2019, "What Would Elsa Do? Freezing Layers During Transformer
Fine-Tuning").

Every parameter P of a chosen block is trained, realised without touching the base (DESIGN.md
principle 1) as a trainable copy P' beside a snapshot P0 (``tuned.py``), acting through ΔP = P' − P0
(0 at init), so several adapters can coexist and unloading is exact:

    Linear / Conv1D   y = W0 x + b0 + (ΔW x + Δb)                      (parallel site)
    Embedding         y = E0[ids] + ΔE[ids]                            (parallel site)
    LayerNorm/RMSNorm y = γ0 ⊙ n(x) + β0 + (Δγ ⊙ n(x) + Δβ)            (``lnfit.NormDelta``)

Merging writes P0 + ΔP into every tensor of the blocks. A block is an entry of an ``nn.ModuleList``
of layers of one class (``model.layers.N``, ``encoder.layer.N``, ``transformer.h.N``; T5's encoder
and decoder are two such stacks). ``top=k`` takes the last k blocks of every stack; ``blocks=...``
names blocks (an exact name, a dotted suffix such as ``layers.11``, or ``re:<regex>``); ``exclude``
keeps modules inside them frozen. A block holding a parameter of another kind of layer is refused.

Mixed batches: norms are gathered per row; the dense layers take the dispatcher's one-sub-batch-per-
adapter path (``per_row=False``: gathering a full ΔW per row would cost a weight copy per row).

Files (peftlab's own format; PEFT has no such method) hold the tuned tensors P' of the blocks under
the base model's own names (``base_model.model.<module>.weight``): strip the prefix and they load
into the base with ``load_state_dict(strict=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig
from peftlab.core.delta import Delta
from peftlab.core.layers import layer_info
from peftlab.core.registry import Requirement, register_method
from peftlab.core.targeting import TargetError, entry_matches, inside_any, is_linear
from peftlab.methods.selective.lnfit import NormDelta, is_norm
from peftlab.methods.selective.tuned import TunedDelta


@dataclass(kw_only=True)
class FreezeLayersConfig(AdapterConfig):
    """``top``: train the last ``top`` blocks of every stack (1 when neither option is given);
    ``blocks``: or train these blocks. ``exclude`` keeps modules inside them frozen."""

    top: int | None = None
    blocks: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.blocks, str):
            self.blocks = [self.blocks]
        elif self.blocks is not None:
            self.blocks = [str(b) for b in self.blocks]
        super().__post_init__()

    def validate(self) -> None:
        self._check(self.top is None or (isinstance(self.top, int) and not isinstance(self.top, bool) and self.top > 0),
                    "top", "a positive int (the number of top blocks to train)")
        self._check(self.blocks is None or len(self.blocks) > 0, "blocks", "a non-empty list of block names")
        self._check(self.top is None or self.blocks is None, "top", "top or blocks, not both")
        for name in ("targets", "layers", "module_types"):
            self._check(getattr(self, name) is None, name,
                        "None: freeze_layers trains whole blocks (choose them with top= or blocks=; exclude= keeps modules frozen)")


def block_stacks(model: nn.Module) -> dict[str, list[str]]:
    """{name of an ``nn.ModuleList`` of blocks: its block names}, in model order: every outermost
    ModuleList whose entries are of one class and each hold parameters."""
    stacks: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or any(name.startswith(s + ".") for s in stacks):
            continue
        if len({type(b) for b in m}) == 1 and all(any(True for _ in b.parameters()) for b in m):
            stacks[name] = [f"{name}.{i}" if name else str(i) for i in range(len(m))]
    return stacks


def chosen_blocks(model: nn.Module, cfg: FreezeLayersConfig) -> list[str]:
    """The names of the blocks ``cfg`` trains, in model order (``TargetError`` listing the blocks
    when an entry matches none or ``top`` exceeds a stack)."""
    stacks = block_stacks(model)
    every = [b for names in stacks.values() for b in names]
    if cfg.blocks is None:
        k = cfg.top or 1
        short = {s: len(n) for s, n in stacks.items() if len(n) < k}
        if short:
            raise TargetError(f"freeze_layers: top={k} but {', '.join(f'{s} has {n}' for s, n in short.items())} blocks")
        return [b for names in stacks.values() for b in names[-k:]]
    for e in cfg.blocks:
        if not any(entry_matches(e, b) for b in every):
            raise TargetError(f"freeze_layers: block {e!r} matches no block of {type(model).__name__}. "
                              f"Blocks: {', '.join(every[:8])}{' ...' if len(every) > 8 else ''}")
    return [b for b in every if any(entry_matches(e, b) for e in cfg.blocks)]


class LinearCopy(TunedDelta):
    """Parallel site on Linear / Conv1D: Δy = ΔW x + Δb, ΔW = W' − W0 (Conv1D stores W as (in, out))."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.conv1d = layer_info(base).kind == "conv1d"
        self._tune(base, [n for n in ("weight", "bias") if getattr(base, n, None) is not None])

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δy = ΔW x + Δb, computed in the copy's dtype and returned in y's."""
        dw = self.delta_of("weight")
        out = F.linear(x.to(dw.dtype), dw.T if self.conv1d else dw, self.delta_of("bias") if "bias" in self.tuned else None)
        return out.to(x.dtype if y is None else y.dtype)

    def rank(self) -> int:
        """Upper bound: ΔW is a full matrix."""
        return min(self.tuned_weight.shape)


class EmbeddingCopy(TunedDelta):
    """Parallel site on an Embedding: Δy = ΔE[ids], ΔE = E' − E0."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self._tune(base, ("weight",))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δy = ΔE[ids] (the rows of ΔE the ids select)."""
        out = F.embedding(x, self.delta_of("weight"))
        return out if y is None else out.to(y.dtype)

    def rank(self) -> int:
        """Upper bound: ΔE is a full matrix."""
        return min(self.tuned_weight.shape)


class NormCopy(NormDelta):
    """``lnfit``'s norm delta, saved under the norm's own names (no PEFT copy in between)."""

    file_prefix = ""


def copy_delta(name: str, module: nn.Module) -> Delta:
    """The delta that trains every parameter held directly by ``module`` (TargetError for a kind of
    layer it cannot train)."""
    if is_norm(module):
        return NormCopy(module)
    if is_linear(module):
        return LinearCopy(module)
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return EmbeddingCopy(module)
    raise TargetError(f"freeze_layers: {name!r} is a {type(module).__name__} holding parameters, which it cannot train "
                      "(it trains Linear, Conv1D, Embedding and LayerNorm / RMSNorm layers); exclude it or choose other blocks")


def _build(model: nn.Module, cfg: FreezeLayersConfig) -> dict[str, Delta]:
    blocks = chosen_blocks(model, cfg)
    placed: dict[str, Delta] = {}
    for name, module in model.named_modules():
        inside = any(name == b or name.startswith(b + ".") for b in blocks)
        if not inside or not any(True for _ in module.parameters(recurse=False)):
            continue
        if any(entry_matches(e, name) for e in cfg.exclude or []) or inside_any(name, cfg.modules_to_save or []):
            continue
        placed[name] = copy_delta(name, module)
    if not placed:
        raise TargetError(f"freeze_layers: nothing left to train in blocks {blocks} (exclude={cfg.exclude})")
    return placed


HAS_BLOCKS = Requirement(
    what="numbered blocks (an nn.ModuleList of layers of one class, e.g. model.layers.N)",
    met=lambda model: bool(block_stacks(model)),
    hint="Without blocks there is nothing to freeze layer by layer; use bitfit, lnfit or lora.",
)

register_method(
    "freeze_layers", FreezeLayersConfig, _build, family="selective", sites=("parallel",), merges=True, per_row=False,
    example="freeze_layers[top=2,exclude=re:.*norm.*]", default_lr=1e-3, needs=(HAS_BLOCKS,),
)
