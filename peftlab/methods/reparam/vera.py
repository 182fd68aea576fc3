"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2024; seed 002 eq. 16).

    h = W0 x + Λ_b B Λ_d A x,      Λ_b = diag(b), b ∈ R^out (b = 0 at init),  Λ_d = diag(d), d ∈ R^r (d = d_initial)

A ∈ R^{r×in} and B ∈ R^{out×r} are frozen random matrices shared by every adapted layer: one pair per
adapter, sized to the largest layer (the largest in and out features among the targets) and sliced,
A[:, :in] and B[:out, :], as Hugging Face PEFT does (``vera_A``, ``vera_B``). Only b and d train:
out + r entries per layer. ΔW = Λ_b B Λ_d A folds into the base weight.

The pair is generated exactly as PEFT generates it, so PEFT's ``projection_prng_key`` reproduces it:
a CPU ``torch.Generator`` seeded with the key draws A, then B, each uniform in ±√(6 / fan_in)
(Kaiming uniform with gain √2; fan_in = the second dimension: in for A, r for B).

Files are PEFT's ``VERA`` format: ``base_model.model.<module>.vera_lambda_b`` / ``vera_lambda_d`` and,
with ``save_projection`` (PEFT's default), the pair once per adapter as ``base_model.vera_A`` /
``base_model.vera_B``; without it the pair is regenerated from the key on loading, both ways.

Mixed batches: one matmul with the row-scaled A of every routed adapter stacked (Λ_d A per adapter),
a gathered mask keeps each row's own block, and one matmul with the column-scaled Λ_b B side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.delta import Delta, per_row
from peftlab.core.io import ADAPTER_LEVEL
from peftlab.core.layers import layer_info, to_module_layout
from peftlab.core.peft_format import modules_to_save_from_peft, modules_to_save_to_peft, targets_from_peft, targets_to_peft
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS


@dataclass(kw_only=True)
class VeraConfig(AdapterConfig):
    """VeRA: rank ``r`` of the shared random pair, its PRNG ``key``, ``save_projection`` (write the
    pair into the file), input ``dropout``, and ``d_initial`` (the start value of d)."""

    r: int = 256
    key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1

    def validate(self) -> None:
        self._check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", "a positive int")
        self._check(isinstance(self.key, int) and not isinstance(self.key, bool), "key", "an int (the PRNG seed)")
        self._check(isinstance(self.save_projection, bool), "save_projection", "true or false")
        self._check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        self._check(isinstance(self.d_initial, (int, float)) and not isinstance(self.d_initial, bool),
                    "d_initial", "a number")

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """PEFT's ``VeraConfig`` fields (a peftlab-only file where PEFT cannot say the selection)."""
        try:
            target_modules, layers = placed_targets(self, placed, VeraLinear, DEFAULT_TARGETS)
        except ConfigError:
            return {"peft_type": "PEFTLAB"}
        return {
            "peft_type": "VERA", "r": self.r, "target_modules": target_modules, "projection_prng_key": self.key,
            "save_projection": self.save_projection, "vera_dropout": self.dropout, "d_initial": self.d_initial,
            "fan_in_fan_out": any(isinstance(d, VeraLinear) and d.kind == "conv1d" for d in (placed or {}).values()),
            "bias": "none", "init_weights": True, "layers_to_transform": layers, "layers_pattern": None,
            "modules_to_save": modules_to_save_to_peft(self.modules_to_save, placed),
            "task_type": None, "inference_mode": True, "base_model_name_or_path": None, "revision": None,
        }


def placed_targets(cfg: AdapterConfig, placed: Mapping[str, nn.Module] | None, own: type, default: list[str],
                   exclude_field: bool = False) -> tuple[list[str] | str | None, list[int] | None]:
    """PEFT's ``target_modules`` and ``layers_to_transform`` for a method whose deltas are ``own``:
    the exact names placed when the placement is known, else the entries (ConfigError for a
    selection PEFT's fields cannot say: ``module_types``, or ``exclude`` without ``exclude_field``)."""
    if placed is not None:
        return sorted(n for n, d in placed.items() if isinstance(d, own)), None
    if cfg.module_types is not None or (cfg.exclude and not exclude_field):
        raise ConfigError("selection")
    target_modules = targets_to_peft(cfg.targets if cfg.targets is not None else default, cfg.layers)
    return target_modules, None if isinstance(target_modules, str) else cfg.layers


def _config_from_peft(d: dict[str, Any]) -> VeraConfig:
    """Our config from PEFT's VERA fields (``bias`` other than none is refused)."""
    if d.get("bias", "none") not in ("none", None):
        raise ConfigError(f"PEFT VERA field bias={d['bias']!r} is not supported (only 'none')")
    layers = d.get("layers_to_transform")
    return VeraConfig(
        r=int(d.get("r", 256)), key=int(d.get("projection_prng_key", 0)),
        save_projection=bool(d.get("save_projection", True)), dropout=float(d.get("vera_dropout", 0.0)),
        d_initial=float(d.get("d_initial", 0.1)), targets=targets_from_peft(d.get("target_modules")),
        layers=[layers] if isinstance(layers, int) else layers, modules_to_save=modules_to_save_from_peft(d),
    )


# -- math -----------------------------------------------------------------------------------------
def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−√(6 / fan_in), √(6 / fan_in)) with fan_in = shape[1], drawn from ``generator`` (PEFT's draw)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, in_features: int, out_features: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair: A (r × in) then B (out × r) from a CPU generator seeded with ``key``."""
    gen = torch.Generator(device="cpu").manual_seed(key)
    A = kaiming_uniform((r, in_features), gen)
    return A, kaiming_uniform((out_features, r), gen)


def vera_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Δh = Λ_b B Λ_d A x = b ⊙ (B (d ⊙ (A x))) for x of shape (..., in)."""
    return b * F.linear(d * F.linear(x, A), B)


def vera_weight(A: torch.Tensor, B: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """ΔW = Λ_b B Λ_d A, (out, in)."""
    return (b.unsqueeze(1) * B) @ (d.unsqueeze(1) * A)


class VeraProjections(nn.Module):
    """The frozen pair of one adapter, a submodule of each of its deltas (held once)."""

    def __init__(self, r: int, in_features: int, out_features: int, key: int):
        super().__init__()
        A, B = projections(r, in_features, out_features, key)
        self.register_buffer("vera_A", A, persistent=False)
        self.register_buffer("vera_B", B, persistent=False)


class VeraLinear(Delta):
    """VeRA on ``nn.Linear`` / ``Conv1D``: parallel site Δh = b ⊙ (B_s (d ⊙ (A_s dropout(x)))), A_s, B_s
    the shared pair sliced to the layer. ``owner``: the delta that saves the pair (one per adapter)."""

    site = "parallel"
    merges_into = ("weight",)

    def __init__(self, base: nn.Module, cfg: VeraConfig, pair: VeraProjections, owner: bool):
        super().__init__()
        info = layer_info(base)
        self.kind, self.in_features, self.out_features = info.kind, info.in_features, info.out_features
        self.r, self.p = cfg.r, float(cfg.dropout)
        self.saves_pair = owner and cfg.save_projection
        self.projections = pair
        self.vera_lambda_b = nn.Parameter(torch.zeros(info.out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial)))

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:, :in] and B[:out, :] of the shared pair."""
        return self.projections.vera_A[:, : self.in_features], self.projections.vera_B[: self.out_features]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = b ⊙ (B_s (d ⊙ (A_s dropout(x))))."""
        A, B = self.sliced()
        xa = F.dropout(x.to(A.dtype), self.p, self.training) if self.p else x.to(A.dtype)
        return vera_delta(xa, A, B, self.vera_lambda_b, self.vera_lambda_d).to(x.dtype if y is None else y.dtype)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = Λ_b B_s Λ_d A_s in the module's own weight layout."""
        A, B = self.sliced()
        return {"weight": to_module_layout(base, vera_weight(A, B, self.vera_lambda_b, self.vera_lambda_d).detach())}

    def rank(self) -> int:
        return min(self.r, self.in_features, self.out_features)

    def file_state(self) -> dict[str, torch.Tensor]:
        state = {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach()}
        if self.saves_pair:  # adapter-level keys, PEFT's: base_model.vera_A / vera_B
            state[ADAPTER_LEVEL + "base_model.vera_A"] = self.projections.vera_A
            state[ADAPTER_LEVEL + "base_model.vera_B"] = self.projections.vera_B
        return state

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.vera_lambda_b.copy_(state["vera_lambda_b"])
            self.vera_lambda_d.copy_(state["vera_lambda_d"])
            if self.saves_pair:
                self.projections.vera_A.copy_(state[ADAPTER_LEVEL + "base_model.vera_A"])
                self.projections.vera_B.copy_(state[ADAPTER_LEVEL + "base_model.vera_B"])

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Mixed batch, every routed adapter at once: H = x [Λ_d1 A_1; Λ_d2 A_2; ...]ᵀ, masked per row
        to its slot's block (one gather), then H [Λ_b1 B_1, Λ_b2 B_2, ...]ᵀ. None when dropout differs."""
        present = [d for d in deltas if d is not None]
        if not all(type(d) is VeraLinear for d in present) or len({d.p if d.training else 0.0 for d in present}) > 1:
            return None
        downs, ups, blocks = [], [], []
        for k, d in enumerate(deltas):
            if d is None:
                continue
            A, B = d.sliced()
            downs.append(d.vera_lambda_d.unsqueeze(1) * A)
            ups.append(d.vera_lambda_b.unsqueeze(1) * B)
            blocks.append(torch.full((A.shape[0],), k, device=A.device))
        owner = torch.cat(blocks)  # slot of each stacked rank row
        keep = per_row([(owner == k).to(downs[0].dtype) for k in range(len(deltas))], slot,
                       torch.zeros_like(owner, dtype=downs[0].dtype))  # (batch, Σr)
        xa = x.to(downs[0].dtype)
        if present[0].p and present[0].training:
            xa = F.dropout(xa, present[0].p, True)
        h = F.linear(xa, torch.cat(downs))
        h = h * keep.view(keep.shape[0], *([1] * (h.dim() - 2)), keep.shape[1])
        return F.linear(h, torch.cat(ups, dim=1)).to(y.dtype)


def _build(model: nn.Module, cfg: VeraConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    infos = [layer_info(m) for m in modules.values()]
    pair = VeraProjections(cfg.r, max(i.in_features for i in infos), max(i.out_features for i in infos), cfg.key)
    return {name: VeraLinear(m, cfg, pair, owner=k == 0) for k, (name, m) in enumerate(modules.items())}


register_method(
    "vera", VeraConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="vera[r=16,targets=q_proj|v_proj,d_initial=0.1]", default_lr=1e-2,
    peft=PeftFormat("VERA", read=_config_from_peft, write=VeraConfig.to_peft),
)
