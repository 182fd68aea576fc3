"""Compacter and Compacter++ (Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex
Adapter Layers"; seed 000 III-D1, seed 001 §11.4, seed 002 §3.3).

A sequential bottleneck adapter (as houlsby: y ← y + W_up σ(W_down y + b_down) + b_up) whose down
and up weights are parameterised hypercomplex multiplication (PHM) layers:

    W = Σ_{i=1..n} A_i ⊗ B_i,     A_i ∈ R^{n×n},   B_i = s_i t_iᵀ ∈ R^{(out/n)×(in/n)},  s_i, t_i of rank r

The "rule" A (n matrices n×n) is shared by every PHM layer of the adapter (down and up, every layer of
the model); s_i, t_i and the biases are per layer. Compacter sits where houlsby does (after the
attention output and the FFN output); Compacter++ only after the FFN (as pfeiffer is to houlsby).

Options: ``n`` (PHM dimension, default 4; it must divide the hidden size), ``r`` (rank of B_i,
default 1), ``reduction_factor`` (default 32) with the bottleneck m = d // reduction_factor rounded
up to a multiple of n, ``activation`` (default gelu), ``adapterdrop``. Parameters: n³ once, plus per
adapted module r(d + m) + m (down) + r(m + d) + d (up).

Init: A_i ~ N(0, 1/n); the down layer's s, t ~ N(0, σ²) with σ⁴ = 1/(3 d r) (so W_down has the
variance of a Kaiming-uniform layer); the up layer's s = 0 and t ~ N(0, σ²) with σ⁴ = 1/(3 m r), and
both biases 0, so W_up = 0 and the model is the base model at init.

Files (our own format; PEFT has no Compacter): ``adapter_down.{s,t,bias}``, ``adapter_up.{s,t,bias}``
under ``base_model.model.<module>``, and the shared rule once, adapter-level, as ``base_model.phm_rule``
(written by the first delta, its owner). Counts take the shared rule once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.delta import Delta
from peftlab.core.io import ADAPTER_LEVEL
from peftlab.core.layers import layer_info
from peftlab.core.registry import register_method
from peftlab.core.targeting import TargetError, is_linear
from peftlab.methods.additive.bottleneck import BottleneckConfig, SequentialBottleneck, _positive_int, select_adapter_modules
from peftlab.methods.additive.houlsby import DEFAULT_TARGETS, FFN_TARGETS


#: The shared rule's file key: adapter-level (``core/io.py``), saved once as ``base_model.phm_rule``.
RULE_KEY = ADAPTER_LEVEL + "base_model.phm_rule"


@dataclass(kw_only=True)
class CompacterConfig(BottleneckConfig):
    """``n`` (PHM dimension), ``r`` (rank of each B_i), ``reduction_factor``, ``activation``,
    ``adapterdrop``."""

    reduction_factor: float = 32
    activation: str = "gelu"
    n: int = 4
    r: int = 1

    def validate(self) -> None:
        super().validate()
        self._check(_positive_int(self.n), "n", "a positive int (the PHM dimension)")
        self._check(_positive_int(self.r), "r", "a positive int (the rank of each B_i)")

    def bottleneck(self, d: int) -> int:
        """d // reduction_factor rounded up to a multiple of n (at least n)."""
        m = super().bottleneck(d)
        return -(-m // self.n) * self.n


@dataclass(kw_only=True)
class CompacterPPConfig(CompacterConfig):
    """As :class:`CompacterConfig`; the default targets are the FFN output projections only."""


def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """W = Σ_i A_i ⊗ (s_i t_iᵀ) (Karimi Mahabadi et al. 2021, eq. 4 with low-rank B_i, eq. 5).

    rule: (n, n, n) = the A_i; s: (n, out/n, r); t: (n, in/n, r). Returns W (out, in) in nn.Linear's
    layout, without forming the Kronecker products: W[p·o' + a, q·i' + b] = Σ_i A_i[p, q] B_i[a, b]."""
    n, out_n, in_n = rule.shape[0], s.shape[1], t.shape[1]
    b = torch.einsum("kar,kbr->kab", s, t)  # B_i = s_i t_iᵀ: (n, out/n, in/n)
    return torch.einsum("kpq,kab->paqb", rule, b).reshape(n * out_n, n * in_n)


class PHMLayer(nn.Module):
    """The per-layer factors of one PHM layer: s (n, out/n, r), t (n, in/n, r), bias (out,); the
    rule A is the adapter's shared one, passed in."""

    def __init__(self, d_in: int, d_out: int, n: int, r: int, zero_s: bool):
        super().__init__()
        sigma = (3.0 * d_in * r) ** -0.25
        self.s = nn.Parameter(torch.zeros(n, d_out // n, r) if zero_s else torch.randn(n, d_out // n, r) * sigma)
        self.t = nn.Parameter(torch.randn(n, d_in // n, r) * sigma)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        """W = Σ_i A_i ⊗ s_i t_iᵀ, shape (out, in)."""
        return phm_weight(rule, self.s, self.t)


class SharedRule(nn.Module):
    """The adapter's rule A (``weight``: n×n×n), one module referenced by every delta of the adapter.

    A submodule registered after the delta's own layers, so that a delta's first tensor is its own
    (``core/follow.py`` reads it to decide whether that delta still has to follow its base)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n, n) / n ** 0.5)


class CompacterAdapter(SequentialBottleneck):
    """Output site: y ← y + up(σ(down(y))) with PHM down/up weights; ``phm_rule`` is the adapter's
    shared A (the same Parameter object in every delta of the adapter)."""

    def __init__(self, base: nn.Module, cfg: CompacterConfig, rule: SharedRule, owner: bool):
        super().__init__()
        d = layer_info(base).out_features
        n = cfg.n
        if d % n:
            raise TargetError(f"{cfg.method}: n={n} must divide the hidden size {d} of {type(base).__name__}")
        self.r = cfg.bottleneck(d)
        self.activation = cfg.activation
        self.owner = owner
        self.adapter_down = PHMLayer(d, self.r, n, cfg.r, zero_s=False)
        self.adapter_up = PHMLayer(self.r, d, n, cfg.r, zero_s=True)
        self.shared = rule  # counted, saved and loaded once (by the owner, the first delta)

    @property
    def phm_rule(self) -> torch.Tensor:
        """The shared A_i, (n, n, n)."""
        return self.shared.weight

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rule = self.phm_rule
        return (self.adapter_down.weight(rule), self.adapter_down.bias,
                self.adapter_up.weight(rule), self.adapter_up.bias)

    def _own(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("shared.")}

    def file_state(self) -> dict[str, torch.Tensor]:
        """Own factors and biases; the shared rule only in the owner's state, adapter-level."""
        return {**self._own(), **({RULE_KEY: self.phm_rule} if self.owner else {})}

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for k, v in state.items():
                own["shared.weight" if k == RULE_KEY else k].copy_(v)

    def changed_params(self, base: nn.Module) -> int:
        """Parameters this delta adds: its own, plus the shared rule for the owner only."""
        return sum(v.numel() for v in self.file_state().values())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.phm_rule.shape[0]}, owner={self.owner}"


def _builder(default: list[str]):
    def build(model: nn.Module, cfg: CompacterConfig) -> dict[str, Delta]:
        modules = select_adapter_modules(model, cfg, default=default, accept=is_linear,
                                         what="Linear or Conv1D layer")
        rule = SharedRule(cfg.n)
        return {name: CompacterAdapter(module, cfg, rule, owner=i == 0) for i, (name, module) in enumerate(modules.items())}

    return build


register_method(
    "compacter", CompacterConfig, _builder(DEFAULT_TARGETS), family="additive", sites=("output",), merges=False,
    per_row=True, example="compacter[n=4,r=1,reduction_factor=32]", default_lr=1e-2,
)
register_method(
    "compacter_pp", CompacterPPConfig, _builder(FFN_TARGETS), family="additive", sites=("output",), merges=False,
    per_row=True, example="compacter_pp[n=4,r=1,reduction_factor=32]", default_lr=1e-2,
)
