"""DyLoRA (Valipour et al. 2023; seed 000 III-C2, seed 002 §3.3): LoRA trained for every rank at once.

Each optimizer step samples one rank b ∈ [r_min, r] (the same b for every layer of the adapter) and
the forward uses the first b components only:

    h = W0 x + (α / b) · B[:, :b] A[:b] x          (α / √b with rsLoRA)

so after training any rank b ≤ r works: ``eval_rank`` picks the one used in eval mode, when merging
and when saving counts (default: r). The sampling is the method's training-time action: it is
declared as :class:`DyLoraTraining` (``core/training.py``), driven by ``pm.on_step()``, and
reproducible (the rank of step t is drawn from a generator seeded by ``seed`` and t).

PEFT has no DyLoRA: files are peftlab's own, with LoRA's tensor names (``lora_A.weight``...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from peftlab.core.delta import Delta
from peftlab.core.registry import register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.core.training import TrainingHooks
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS, LoraConfig
from peftlab.methods.reparam.lora.deltas import LoraLinear
from peftlab.methods.reparam.lora.functional import lora_delta


@dataclass(kw_only=True)
class DyLoraConfig(LoraConfig):
    """DyLoRA: ``r`` is the largest rank; training samples b in [``r_min``, ``r``] each step;
    ``eval_rank`` (default ``r``) is the rank used in eval mode, for merging and for counts."""

    r_min: int = 1
    eval_rank: int | None = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        self._check(self.init in ("kaiming", "gaussian"), "init", "kaiming or gaussian")
        self._check(self.dropout == 0, "dropout", "0 (DyLoRA samples ranks instead)")
        self._check(isinstance(self.r_min, int) and not isinstance(self.r_min, bool) and 1 <= self.r_min <= self.r,
                    "r_min", f"an int in [1, r={self.r}]")
        self._check(self.eval_rank is None or (isinstance(self.eval_rank, int) and 1 <= self.eval_rank <= self.r),
                    "eval_rank", f"none or an int in [1, r={self.r}]")
        self._check(isinstance(self.seed, int), "seed", "an int")
        self._check(not self.gate, "gate", "false (dylora has no gated variant)")

    def rank_scaling(self, b: int) -> float:
        """α / b (α / √b with rsLoRA): LoRA's scale at rank b."""
        return self.alpha / (math.sqrt(b) if self.rslora else b)


def truncated_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, b: int, scaling: float) -> torch.Tensor:
    """Δh = s_b · B[:, :b] A[:b] x: LoRA with only its first b components."""
    return lora_delta(x, A[:b], B[:, :b], scaling)


class DyLoraLinear(LoraLinear):
    """LoRA whose forward uses the first ``train_rank`` components in training mode and the first
    ``eval_rank`` in eval mode (and for merging)."""

    def __init__(self, base: nn.Module, cfg: DyLoraConfig):
        super().__init__(base, cfg)
        self.cfg = cfg
        self.train_rank = cfg.r
        self.eval_rank = cfg.eval_rank or cfg.r

    def rank_in_use(self) -> int:
        """The rank of the current forward: the sampled one in training, ``eval_rank`` otherwise."""
        return self.train_rank if self.training else self.eval_rank

    def _lora_out(self, x: torch.Tensor, p: float) -> torch.Tensor:
        b = self.rank_in_use()
        return truncated_delta(x, self.lora_A.weight, self.lora_B.weight, b, self.cfg.rank_scaling(b))

    def delta_out_in(self) -> torch.Tensor:
        """ΔW = s_b · B[:, :b] A[:b] at the eval rank b."""
        b = self.eval_rank
        return self.cfg.rank_scaling(b) * (self.lora_B.weight[:, :b] @ self.lora_A.weight[:b])

    def rank(self) -> int:
        return self.eval_rank

    @classmethod
    def forward_routed(cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor | None:
        return None  # ranks differ per adapter and per step: one sub-batch per adapter


class DyLoraTraining(TrainingHooks):
    """Samples the rank of each step for every delta of the adapter (the same b everywhere)."""

    def __init__(self, config: DyLoraConfig, deltas: dict[str, nn.Module]):
        super().__init__(config, deltas)
        self.step = 0
        self._apply(self.sample_rank(0))

    def sample_rank(self, step: int) -> int:
        """b ~ Uniform{r_min, ..., r}, drawn from a generator seeded by (seed, step)."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        return int(torch.randint(self.config.r_min, self.config.r + 1, (1,), generator=gen))

    def _apply(self, b: int) -> None:
        for d in self.deltas.values():
            d.train_rank = b

    def on_step(self, step: int) -> None:
        """The next step trains rank ``sample_rank(step)``."""
        self.step = step
        self._apply(self.sample_rank(step))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.on_step(int(state["step"]))


def _build(model: nn.Module, cfg: DyLoraConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    return {name: DyLoraLinear(module, cfg) for name, module in modules.items()}


register_method(
    "dylora", DyLoraConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=False,
    example="dylora[r=8,r_min=2,alpha=16,eval_rank=4]", default_lr=3e-3, training=DyLoraTraining,
)


def set_eval_rank(pm: nn.Module, adapter_name: str, rank: int) -> None:
    """Use the first ``rank`` components of a trained DyLoRA adapter from now on (eval mode,
    merging, counts): the point of DyLoRA, one training run serving every rank ≤ r."""
    cfg = pm.configs[adapter_name]
    if not isinstance(cfg, DyLoraConfig):
        raise TypeError(f"adapter {adapter_name!r} is {cfg.method}, not dylora")
    if not 1 <= rank <= cfg.r:
        raise ValueError(f"rank must be in [1, r={cfg.r}], got {rank}")
    if adapter_name in pm._state.merged:
        raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge() before changing its rank")
    for _, _, d in pm.placements[adapter_name]:
        if isinstance(d, DyLoraLinear):
            d.eval_rank = rank
    pm.configs[adapter_name] = cfg.replace(eval_rank=rank)
