"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"; seed 000 eq. 10-11,
seed 001 §8.2, seed 002 eq. 9-10).

Learned vectors rescale keys, values and the FFN's inner activation:

    softmax(Q (l_k ⊙ K)ᵀ / √d) (l_v ⊙ V),        (l_ff ⊙ σ(W_1 x)) W_2

realised on the projections themselves, all vectors starting at 1 (identity at init):

    output site (k/v projections):   y ← l ⊙ y                 = (diag(l) W) x + l ⊙ b
    input site (FFN's W_2):          x ← l ⊙ x,  y = W (l ⊙ x) + b = (W diag(l)) x + b

Both fold into the base weights: the output site into the rows of W and into the bias, the input site
into the columns of W (not the bias). ΔW = W' − W0 depends on W0, so the container keeps it at merge
(``merge_uses_base``). On GPT-2's fused ``c_attn`` the vector also scales the queries, as in PEFT.

Files are Hugging Face PEFT's IA3 format: ``base_model.model.<module>.ia3_l`` of shape (out, 1) for
output-site modules and (1, in) for feed-forward ones; config fields ``peft_type="IA3"``,
``target_modules``, ``feedforward_modules``, ``init_ia3_weights``, ``fan_in_fan_out``...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.delta import Delta, broadcast_rows, per_row
from peftlab.core.layers import layer_info, to_module_layout, weight_out_in
from peftlab.core.peft_format import (
    exclude_to_peft,
    modules_to_save_from_peft,
    modules_to_save_to_peft,
    targets_from_peft,
    targets_to_peft,
)
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import TargetError, entry_matches, is_linear, select_modules

#: BERT/ViT's FFN output ``encoder.layer.N.output.dense``, not ``attention.output.dense``.
_BERT_FFN_OUT = r"re:(?:.*\.)?\d+\.output\.dense"
#: Feed-forward second projections (input site) of Llama, BERT, T5, GPT-2 and ViT/CLIP (``mlp.fc2``).
DEFAULT_FEEDFORWARD = ["down_proj", _BERT_FFN_OUT, "DenseReluDense.wo", "mlp.c_proj", "mlp.fc2"]
#: Keys and values (GPT-2: the fused q/k/v projection) plus the feed-forward projections.
DEFAULT_TARGETS = ["k_proj", "v_proj", "key", "value", "SelfAttention.k", "SelfAttention.v", "EncDecAttention.k",
                   "EncDecAttention.v", "c_attn", *DEFAULT_FEEDFORWARD]


@dataclass(kw_only=True)
class IA3Config(AdapterConfig):
    """``targets``: modules to rescale; ``feedforward``: which of them are scaled at their input
    (default: the feed-forward second projections of the common architectures)."""

    feedforward: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.feedforward, str):
            self.feedforward = [self.feedforward]
        elif self.feedforward is not None:
            self.feedforward = [str(f) for f in self.feedforward]
        super().__post_init__()

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``IA3Config`` fields. A selection PEFT cannot express (``module_types``)
        is written as a peftlab-only file (PEFT then refuses it instead of loading something else).
        ``placed`` (module name -> delta, when the caller has the placed adapter) tells whether the
        layers are GPT-2 ``Conv1D`` (``fan_in_fan_out``; PEFT would otherwise fix it with a warning)."""
        targets = self.targets if self.targets is not None else DEFAULT_TARGETS
        feedforward = self.feedforward if self.feedforward is not None else DEFAULT_FEEDFORWARD
        try:
            if self.module_types is not None:
                raise ConfigError("module_types")
            target_modules = targets_to_peft(targets, self.layers, layers_field=False)
        except ConfigError:
            return {"peft_type": "PEFTLAB"}
        return {
            "peft_type": "IA3",
            "target_modules": target_modules,
            "exclude_modules": exclude_to_peft(self.exclude),
            # Always a regex: PEFT's feed-forward list rule is ``name.endswith(entry)`` without the
            # dot, which can select more than our entries do.
            "feedforward_modules": targets_to_peft(feedforward, bare_suffix=True),
            "fan_in_fan_out": any(isinstance(d, IA3Delta) and d.kind == "conv1d" for d in (placed or {}).values()),
            "init_ia3_weights": True,
            "modules_to_save": modules_to_save_to_peft(self.modules_to_save, placed),
            "task_type": None,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
        }


def _config_from_peft(d: dict[str, Any]) -> IA3Config:
    """Our config from PEFT's IA3 fields (no ``feedforward_modules``: no feed-forward module; neither
    ``target_modules`` nor ``feedforward_modules``, as in a fresh ``peft.IA3Config()``: both defaults)."""
    ff, targets = d.get("feedforward_modules"), d.get("target_modules")
    return IA3Config(
        targets=targets_from_peft(targets),
        exclude=targets_from_peft(d.get("exclude_modules")),
        feedforward=targets_from_peft(ff, bare_suffix=True) if ff is not None else ([] if targets is not None else None),
        modules_to_save=modules_to_save_from_peft(d),
    )




# -- math -----------------------------------------------------------------------------------------
def ia3_weight_delta(w_out_in: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor, feedforward: bool):
    """(ΔW, Δb) in (out, in) layout: output site diag(l) W − W and (l − 1) ⊙ b; input site W diag(l) − W."""
    dl = l.reshape(-1) - 1
    if feedforward:
        return w_out_in * dl.view(1, -1), None
    return w_out_in * dl.view(-1, 1), (bias * dl if bias is not None else None)


class IA3Delta(Delta):
    """(IA)³ vector on one Linear/Conv1D: y ← l ⊙ y (output site) or x ← l ⊙ x (input site, feed-forward)."""

    merge_uses_base = True

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        info = layer_info(base)
        self.feedforward = feedforward
        self.site = "input" if feedforward else "output"  # type: ignore[misc]
        # Kept 1-d (so ``param_groups`` gives it no weight decay); files use PEFT's 2-d shapes.
        self.file_shape = (1, info.in_features) if feedforward else (info.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(info.in_features if feedforward else info.out_features))
        has_bias = getattr(base, "bias", None) is not None
        self.merges_into = ("weight",) if feedforward or not has_bias else ("weight", "bias")  # type: ignore[misc]
        self.n_in, self.n_out, self.kind = info.in_features, info.out_features, info.kind

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """l ⊙ y at the output site, l ⊙ x at the input site (the feed-forward's second projection)."""
        t = x if self.feedforward else y
        assert t is not None
        return (t.to(self.ia3_l.dtype) * self.ia3_l).to(t.dtype)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Mixed batch as one gather: row i is scaled by l of its slot (slot −1: ones)."""
        present = [d for d in deltas if d is not None]
        t = x if y is None else y
        ref = present[0].ia3_l  # type: ignore[union-attr]
        scale = per_row([d.ia3_l if d is not None else None for d in deltas], slot, torch.ones_like(ref))  # type: ignore[union-attr]
        return (t.to(ref.dtype) * broadcast_rows(scale, t)).to(t.dtype)

    def file_state(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l.detach().reshape(self.file_shape)}

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.ia3_l.copy_(state["ia3_l"].reshape(-1))

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """(ΔW, Δb) that merging adds: (diag(l) − I) W and (l − 1) ⊙ b, or W (diag(l) − I) at the input site."""
        l = self.ia3_l.detach()
        w = weight_out_in(base).to(l.dtype)
        bias = base.bias.to(l.dtype) if "bias" in self.merges_into else None
        dw, db = ia3_weight_delta(w, bias, l, self.feedforward)
        out = {"weight": to_module_layout(base, dw)}
        if db is not None:
            out["bias"] = db
        return out

    def rank(self) -> int:
        """Upper bound: ΔW = diag(l − 1) W (or W diag(l − 1)) has the rank of W at most."""
        return min(self.n_in, self.n_out)

    def extra_repr(self) -> str:
        return f"site={self.site}, size={self.ia3_l.numel()}"


def _build(model: nn.Module, cfg: IA3Config) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    feedforward = cfg.feedforward if cfg.feedforward is not None else DEFAULT_FEEDFORWARD
    if cfg.feedforward:
        for e in cfg.feedforward:
            if not any(entry_matches(e, n) for n in modules):
                raise TargetError(
                    f"ia3: feedforward entry {e!r} matches none of the targeted modules "
                    f"(feed-forward modules must be among the targets; targeted: {', '.join(list(modules)[:6])}...)"
                )
    return {n: IA3Delta(m, any(entry_matches(e, n) for e in feedforward)) for n, m in modules.items()}


register_method(
    "ia3", IA3Config, _build, family="additive", sites=("output", "input"), merges=True, per_row=True,
    example="ia3[targets=k_proj|v_proj|down_proj,feedforward=down_proj]", default_lr=2e-2,
    peft=PeftFormat("IA3", read=_config_from_peft, write=IA3Config.to_peft),
)
