"""AdaLoRA (Zhang et al. 2023; seed 000 III-C2, seed 002 eq. 13): LoRA in SVD form with a rank budget.

    h = W0 x + s · P (Λ ⊙ m) Q x,      P = lora_B (out×r), Λ = lora_E (r), Q = lora_A (r×in), r = init_r
    s = α / (init_r + 1e-5)            (PEFT's ``scaling / (ranknum + 1e-5)``; ranknum stays init_r)

m is the rank mask (1 = kept). Λ = 0 and P, Q ~ N(0, 0.02²) at init, as in PEFT, so the adapter starts
at the base. Training adds two things (:class:`AdaLoraTraining`, driven by ``pm.regularizer()`` and
``pm.on_step()``):

* the orthogonality penalty (``orth_reg_weight`` = γ): with ``orth_reg=paper`` (seed 002 eq. 13)
  γ · Σ_modules (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F); with ``orth_reg=peft``, what PEFT and the authors'
  code compute: γ · mean over every P and Q of ‖PᵀP − I‖_F, resp. ‖QQᵀ − I‖_F (unsquared).
* the rank budget, PEFT's ``RankAllocator.update_and_allocate``: after each optimizer step t
  (before the gradients are cleared), for every entry w of P, Λ, Q: I = |w · ∇w|,
  Ī ← β1 Ī + (1 − β1) I, Ū ← β2 Ū + (1 − β2) |I − Ī|, s(w) = Ī · Ū; the score of triplet i is
  s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji). The budget b(t) (singular values over all modules of
  the adapter) is init_r·n until ``tinit``, then falls cubically,
  b(t) = ⌊(b0 − bT)(1 − (t − tinit)/(total_step − tfinal − tinit))³ + bT⌋, bT = target_r·n, and is bT
  from total_step − tfinal on. Every ``deltaT`` steps of the falling phase, and once at
  t = total_step − tfinal, every triplet whose score is ≤ the (b0 − b)-th smallest is masked and
  its Λ_i set to 0; after that the mask is fixed (Λ re-zeroed each step) and the statistics dropped.

Masked singular values are out of the forward and of the merge (ΔW = s · P (Λ ⊙ m) Q) and are not
counted in ``pm.report()["ranks"]``; their Λ_i still receives its gradient (straight-through: the
gradient at Λ_i = 0), so, as in the paper and in PEFT, a pruned triplet keeps its score and can come
back at the next allocation. With ``deltaT = 1`` this is PEFT's training exactly; with a larger
``deltaT``, PEFT's forward also sees the masked Λ_i regrow between allocations, ours does not.

Files are PEFT's ``ADALORA``: ``lora_A``, ``lora_E``, ``lora_B`` per module (``ranknum`` is not
saved, as in PEFT 0.21); with a ``rank_pattern`` only the kept triplets are written, and the pattern
(``{"<module>.lora_E": [kept...]}``) tells the reader which. Each allocation records the current
pattern in the adapter's config (as PEFT's allocator does), so saving, ``report()`` and the config
string carry the pruned ranks; our ``rank_pattern`` is a list of ``"<module>:<bits>"``, e.g.
``model.layers.0.self_attn.q_proj:110100110011``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.delta import Delta, per_row
from peftlab.core.layers import layer_info, to_module_layout
from peftlab.core.peft_format import (
    exclude_to_peft,
    modules_to_save_from_peft,
    modules_to_save_to_peft,
    targets_from_peft,
    targets_to_peft,
)
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.core.training import TrainingHooks
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS
from peftlab.methods.reparam.lora.functional import lora_delta

#: PEFT divides by ``ranknum + 1e-5``; kept so that outputs match PEFT's to float rounding.
RANKNUM_EPS = 1e-5
ORTH_REGS = ("paper", "peft")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(kw_only=True)
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA (PEFT's field names): ``init_r`` triplets per module pruned toward ``target_r`` on
    average over ``total_step`` steps (schedule: ``tinit``, ``tfinal``, ``deltaT``; statistics:
    ``beta1``, ``beta2``); ``orth_reg_weight`` and ``orth_reg`` (paper | peft) set the penalty;
    ``rank_pattern`` ("module:bits" entries) fixes which triplets are kept."""

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    orth_reg: str = "paper"
    total_step: int | None = None
    rank_pattern: list[str] | None = None

    def validate(self) -> None:
        self._check(_is_int(self.init_r) and self.init_r > 0, "init_r", "a positive int")
        self._check(_is_int(self.target_r) and 1 <= self.target_r <= self.init_r, "target_r",
                    f"an int in [1, init_r={self.init_r}]")
        self._check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", "a positive number")
        self._check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        for name in ("tinit", "tfinal"):
            self._check(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an int >= 0")
        self._check(_is_int(self.deltaT) and self.deltaT >= 1, "deltaT", "an int >= 1")
        for name in ("beta1", "beta2"):
            self._check(isinstance(getattr(self, name), (int, float)) and 0 < getattr(self, name) < 1, name,
                        "a number in (0, 1)")
        self._check(isinstance(self.orth_reg_weight, (int, float)) and self.orth_reg_weight >= 0,
                    "orth_reg_weight", "a number >= 0")
        self._check(self.orth_reg in ORTH_REGS, "orth_reg", f"one of {', '.join(ORTH_REGS)}")
        self._check(self.total_step is None or (_is_int(self.total_step) and self.total_step > 0),
                    "total_step", "none or a positive int")
        if self.total_step is not None:
            self._check(self.tinit < self.total_step - self.tfinal, "tinit",
                        f"less than total_step - tfinal = {self.total_step - self.tfinal} (no budgeting phase left)")
        if self.rank_pattern is not None:
            self._check(all(_pattern_entry_ok(e, self.init_r) for e in self.rank_pattern), "rank_pattern",
                        f"'<module>:<bits>' entries, one 0/1 per triplet (init_r={self.init_r} bits)")

    @property
    def scaling(self) -> float:
        """s = α / (init_r + 1e-5), PEFT's scale."""
        return self.alpha / (self.init_r + RANKNUM_EPS)

    def masks(self) -> dict[str, list[bool]] | None:
        """``rank_pattern`` as {module name: kept flags}, or None."""
        if self.rank_pattern is None:
            return None
        out = {}
        for entry in self.rank_pattern:
            name, _, bits = entry.rpartition(":")
            out[name] = [b == "1" for b in bits]
        return out


def _pattern_entry_ok(entry: Any, r: int) -> bool:
    if not isinstance(entry, str):
        return False
    name, sep, bits = entry.rpartition(":")
    return bool(sep and name) and len(bits) == r and set(bits) <= {"0", "1"}


def pattern_entries(masks: Mapping[str, Sequence[bool]]) -> list[str]:
    """{module: kept flags} as ``rank_pattern`` entries ``"<module>:<bits>"``."""
    return [f"{name}:{''.join('1' if k else '0' for k in keep)}" for name, keep in masks.items()]


# -- the math ------------------------------------------------------------------------------------------
def svd_delta_weight(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s · P diag(Λ) Q with P = B (out×r), Λ = E (r×1), Q = A (r×in) (seed 002 eq. 13)."""
    return scaling * (B @ (E * A))


def orthogonality_terms(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F) for Q = A (r×in), P = B (out×r): how far the rows of Q and the
    columns of P are from orthonormal (AdaLoRA's regularizer R(P, Q), seed 002 eq. 13)."""
    eye = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
    return torch.linalg.matrix_norm(A @ A.T - eye), torch.linalg.matrix_norm(B.T @ B - eye)


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> tuple[int, bool]:
    """(budget b(t), whether to mask at step t): b0 until ``tinit``; then the cubic
    ⌊(b0 − bT)(1 − (t − tinit)/(total_step − tfinal − tinit))³ + bT⌋, masking every ``delta_t``
    steps; bT (masking) after total_step − tfinal. PEFT's ``RankAllocator.budget_schedule``."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % delta_t == 0


def update_sensitivity(w: torch.Tensor, grad: torch.Tensor | None, ipt: torch.Tensor, unc: torch.Tensor,
                       beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of AdaLoRA's smoothed sensitivity and uncertainty, entry by entry:
    I = |w · ∇w|, Ī ← β1 Ī + (1 − β1) I, Ū ← β2 Ū + (1 − β2) |I − Ī| (Zhang et al. 2023, eq. 8-9).
    A missing gradient counts as 0."""
    now = (w * grad).abs() if grad is not None else torch.zeros_like(w)
    ipt = beta1 * ipt + (1 - beta1) * now
    unc = beta2 * unc + (1 - beta2) * (now - ipt).abs()
    return ipt, unc


def triplet_scores(sA: torch.Tensor, sE: torch.Tensor, sB: torch.Tensor) -> torch.Tensor:
    """S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji) for entry scores s = Ī · Ū of A (r×in),
    E (r×1), B (out×r): the importance of triplet i (eq. 10)."""
    return sE.view(-1) + sA.mean(dim=1) + sB.mean(dim=0)


def keep_within_budget(scores: Sequence[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Kept flags per module: with k = (all triplets) − budget, every triplet whose score is ≤ the
    k-th smallest over all modules is masked (ties all go, as in PEFT); k ≤ 0 keeps everything."""
    flat = torch.cat([s.view(-1) for s in scores])
    k = flat.numel() - budget
    if k <= 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    threshold = torch.kthvalue(flat.float().cpu(), k).values.item()
    return [s > threshold for s in scores]


# -- the delta -----------------------------------------------------------------------------------------
class SvdLinear(Delta):
    """AdaLoRA on ``nn.Linear`` or ``Conv1D``: parallel site, Δh = s · P (Λ ⊙ m) Q dropout(x).
    Parameters have PEFT's names: ``lora_A`` (Q, r×in), ``lora_E`` (Λ, r×1), ``lora_B`` (P, out×r);
    ``rank_mask`` (r, bool) holds m."""

    site = "parallel"
    merges_into = ("weight",)

    def __init__(self, base: nn.Module, cfg: AdaLoraConfig):
        super().__init__()
        info = layer_info(base)
        self.__dict__["base_layer"] = base  # a reference, not a submodule: the base stays outside the adapter
        self.r, self.scaling, self.p = cfg.init_r, cfg.scaling, float(cfg.dropout)
        self.lora_A = nn.Parameter(torch.randn(cfg.init_r, info.in_features) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(cfg.init_r, 1))
        self.lora_B = nn.Parameter(torch.randn(info.out_features, cfg.init_r) * 0.02)
        self.register_buffer("rank_mask", torch.ones(cfg.init_r, dtype=torch.bool), persistent=False)

    def masked_E(self) -> torch.Tensor:
        """Λ ⊙ m; under autograd the masked Λ_i still get their gradient (straight-through)."""
        E, m = self.lora_E, self.rank_mask.unsqueeze(1)
        if torch.is_grad_enabled() and E.requires_grad:
            return E - (E * ~m).detach()  # value Λ ⊙ m, d/dΛ = 1
        return E * m

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = s · P (Λ ⊙ m) Q dropout(x)."""
        out = lora_delta(x.to(self.lora_A.dtype), self.masked_E() * self.lora_A, self.lora_B, self.scaling,
                         self.p, self.training)
        return out.to(x.dtype if y is None else y.dtype)

    def delta_out_in(self) -> torch.Tensor:
        """ΔW = s · P (Λ ⊙ m) Q in (out, in) layout."""
        return svd_delta_weight(self.lora_A, self.lora_E * self.rank_mask.unsqueeze(1), self.lora_B, self.scaling)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW in the module's own weight layout."""
        return {"weight": to_module_layout(base, self.delta_out_in().detach())}

    def rank(self) -> int:
        """The number of unmasked singular values."""
        return int(self.rank_mask.sum())

    def set_mask(self, keep: torch.Tensor) -> None:
        """Keep the triplets flagged in ``keep`` and set the others' Λ_i to 0 (the adapter's config
        must say the same: use :func:`set_rank_pattern`, or leave it to the training hooks)."""
        with torch.no_grad():
            self.rank_mask.copy_(keep.view(-1).to(self.rank_mask.device))
            self.lora_E.mul_(self.rank_mask.unsqueeze(1))

    def file_state(self) -> dict[str, torch.Tensor]:
        """PEFT's tensors: only the kept triplets when some are masked (the config's rank_pattern)."""
        keep = self.rank_mask
        E = self.lora_E * keep.unsqueeze(1)
        if bool(keep.all()):
            return {"lora_A": self.lora_A, "lora_E": E, "lora_B": self.lora_B}
        return {"lora_A": self.lora_A[keep], "lora_E": E[keep], "lora_B": self.lora_B[:, keep]}

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        keep = self.rank_mask
        with torch.no_grad():
            for name, rows in (("lora_A", state["lora_A"]), ("lora_E", state["lora_E"])):
                p = getattr(self, name)
                p.zero_()
                p[keep] = rows.to(p.dtype)
            self.lora_B.zero_()
            self.lora_B[:, keep] = state["lora_B"].to(self.lora_B.dtype)

    @classmethod
    def forward_routed(cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor | None:
        """Mixed batch as two gathered batched matmuls: row i uses (P (Λ ⊙ m) Q, s) of its adapter;
        ranks zero-padded to the largest, slot -1 an all-zero adapter."""
        present = [d for d in deltas if d is not None]
        dropout = {d.p if d.training else 0.0 for d in present}
        if any(type(d) is not cls for d in present) or len(dropout) > 1:
            return None
        r = max(d.r for d in present)
        ref = present[0].lora_A
        down = per_row([F.pad(d.masked_E() * d.lora_A, (0, 0, 0, r - d.r)) if d is not None else None for d in deltas],
                       slot, ref.new_zeros(r, ref.shape[1]))
        up = per_row([F.pad(d.lora_B, (0, r - d.r)) if d is not None else None for d in deltas],
                     slot, ref.new_zeros(present[0].lora_B.shape[0], r))
        scale = per_row([ref.new_tensor(d.scaling) if d is not None else None for d in deltas], slot, ref.new_zeros(()))
        xf = x.reshape(x.shape[0], -1, x.shape[-1]).to(ref.dtype)
        if dropout != {0.0}:
            xf = F.dropout(xf, dropout.pop(), training=True)
        h = torch.bmm(xf, down.transpose(1, 2)) * scale.view(-1, 1, 1)
        out = torch.bmm(h, up.transpose(1, 2))
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(y.dtype)


# -- training: the penalty and the rank budget ------------------------------------------------------------
_PARTS = ("lora_A", "lora_E", "lora_B")


#: id(config) -> the hooks whose masks that config object records (one adapter per config object).
_OWNERS: weakref.WeakValueDictionary[int, "AdaLoraTraining"] = weakref.WeakValueDictionary()


class AdaLoraTraining(TrainingHooks):
    """AdaLoRA's orthogonality penalty (``regularizer``) and rank budget (``on_step``), for the
    deltas of one adapter: one budget over all of its modules, as PEFT's ``RankAllocator``."""

    def __init__(self, config: AdaLoraConfig, deltas: dict[str, nn.Module]):
        super().__init__(config, deltas)
        _OWNERS[id(config)] = self
        self.step = 0
        self.init_bgt = sum(d.r for d in deltas.values())
        self.target_bgt = config.target_r * len(deltas)
        self.ema: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.last_budget = self.init_bgt

    def begin(self, total_steps: int | None) -> None:
        """A config without ``total_step`` takes the run's planned number of steps (validated as if
        it had been given)."""
        if self.config.total_step is None and total_steps is not None:
            self.config.total_step = int(total_steps)
            try:
                self.config.validate()
            except ConfigError:
                self.config.total_step = None
                raise

    def regularizer(self) -> torch.Tensor | None:
        """γ · Σ (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F) (``orth_reg=paper``) or γ · mean of the unsquared
        norms over every P and Q (``orth_reg=peft``)."""
        if not self.deltas or self.config.orth_reg_weight == 0:
            return None
        terms = [t for d in self.deltas.values() for t in orthogonality_terms(d.lora_A, d.lora_B)]
        if self.config.orth_reg == "paper":
            total = sum(t.square() for t in terms)
        else:
            total = sum(terms) / len(terms)
        return self.config.orth_reg_weight * total

    def budget(self, step: int) -> tuple[int, bool]:
        """(budget, mask now) at ``step`` for this adapter (:func:`budget_schedule`)."""
        c = self.config
        c._check(c.total_step is not None, "total_step",
                 "the number of training steps: the rank budget schedule needs it (e.g. adalora[total_step=1000])")
        return budget_schedule(step, self.init_bgt, self.target_bgt, c.tinit, c.tfinal, c.total_step, c.deltaT)

    def _update_scores(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for name, d in self.deltas.items():
            state = self.ema.setdefault(name, {})
            for part in _PARTS:
                p = getattr(d, part)
                ipt, unc = state.get(part, (torch.zeros_like(p), torch.zeros_like(p)))
                with torch.no_grad():
                    state[part] = update_sensitivity(p.detach(), p.grad, ipt, unc, b1, b2)

    def scores(self) -> dict[str, torch.Tensor]:
        """The current importance of every triplet, per module (:func:`triplet_scores`)."""
        out = {}
        for name in self.deltas:
            s = {part: ipt * unc for part, (ipt, unc) in self.ema[name].items()}
            out[name] = triplet_scores(s["lora_A"], s["lora_E"], s["lora_B"])
        return out

    def _mask_to(self, budget: int) -> None:
        scores = self.scores()
        keeps = keep_within_budget(list(scores.values()), budget)
        self._apply({name: keep for name, keep in zip(scores, keeps)})

    def _apply(self, keeps: Mapping[str, torch.Tensor]) -> None:
        _record_masks(self.config, self.deltas, keeps)

    def on_step(self, step: int) -> None:
        """PEFT's ``update_and_allocate(step)``: update the scores before total_step − tfinal, mask
        to the budget on schedule, fix the mask at total_step − tfinal, keep it fixed afterwards."""
        self.step = step
        budget, mask_now = self.budget(step)
        final = self.config.total_step - self.config.tfinal
        if step < final:
            self._update_scores()
            if mask_now:
                self._mask_to(budget)
        elif step == final:
            if not self.ema:  # resumed exactly here without statistics: score what the gradients say now
                self._update_scores()
            self._mask_to(budget)
            self.ema = {}
        else:
            for d in self.deltas.values():
                d.set_mask(d.rank_mask)
        self.last_budget = budget

    def state_dict(self) -> dict[str, Any]:
        """Step, score statistics (Ī, Ū per entry), masks, and the pruned triplets' P, Λ, Q (files
        keep only the kept ones, as PEFT's, but a pruned triplet can come back): what resuming needs."""
        pruned = {n: {p: getattr(d, p).detach()[~d.rank_mask].clone() for p in ("lora_A", "lora_E")}
                  | {"lora_B": d.lora_B.detach()[:, ~d.rank_mask].clone()} for n, d in self.deltas.items()}
        return {"step": self.step, "last_budget": self.last_budget,
                "ema": {n: {p: (i.clone(), u.clone()) for p, (i, u) in s.items()} for n, s in self.ema.items()},
                "masks": {n: d.rank_mask.clone() for n, d in self.deltas.items()}, "pruned": pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the masks also go to the config)."""
        self.step = int(state["step"])
        self.last_budget = int(state.get("last_budget", self.init_bgt))
        self.ema = {n: {p: tuple(t.to(getattr(self.deltas[n], p).device).clone() for t in pair)
                        for p, pair in s.items()} for n, s in state["ema"].items()}
        masks = state.get("masks", {})
        if masks and not all(bool(m.all()) for m in masks.values()):
            self._apply(masks)
        with torch.no_grad():
            for n, rows in state.get("pruned", {}).items():
                d = self.deltas[n]
                off = ~d.rank_mask
                d.lora_A[off] = rows["lora_A"].to(d.lora_A)
                d.lora_E[off] = rows["lora_E"].to(d.lora_E)
                d.lora_B[:, off] = rows["lora_B"].to(d.lora_B)


def _record_masks(cfg: AdaLoraConfig, deltas: Mapping[str, nn.Module], keeps: Mapping[str, Any]) -> None:
    """Set the masks of ``deltas`` and, as PEFT's allocator does, record the pattern in the
    adapter's own config object (saving, report() and the config string read it from there)."""
    for name, keep in keeps.items():
        deltas[name].set_mask(torch.as_tensor(keep, dtype=torch.bool))
    cfg.rank_pattern = pattern_entries({n: d.rank_mask.tolist() for n, d in deltas.items()})


def set_rank_pattern(pm: nn.Module, adapter_name: str, keeps: Mapping[str, Sequence[bool]]) -> None:
    """Keep only the flagged singular values of an AdaLoRA adapter's modules ({module: kept flags},
    init_r flags each); the pruned Λ_i are set to 0 and the config's ``rank_pattern`` follows."""
    cfg = pm.configs[adapter_name]
    if not isinstance(cfg, AdaLoraConfig):
        raise TypeError(f"adapter {adapter_name!r} is {cfg.method}, not adalora")
    deltas = {m: d for _, m, d in pm.placements[adapter_name] if isinstance(d, SvdLinear)}
    bad = [m for m, k in keeps.items() if m not in deltas or len(k) != deltas[m].r]
    if bad:
        raise ValueError(f"rank pattern for {bad[:3]}: not an adapted module, or not init_r={cfg.init_r} flags")
    if adapter_name in pm._state.merged:
        raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge() before changing its ranks")
    _record_masks(cfg, deltas, keeps)


# -- placement and PEFT's files ---------------------------------------------------------------------------
def _build(model: nn.Module, cfg: AdaLoraConfig) -> dict[str, Delta]:
    owner = _OWNERS.get(id(cfg))
    if owner is not None and owner.config is cfg:
        raise ValueError("this AdaLoraConfig object is the config of a placed adapter already (its rank_pattern "
                         "records that adapter's masks); give each adapter its own, e.g. cfg.replace()")
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    placed = {name: SvdLinear(module, cfg) for name, module in modules.items()}
    masks = cfg.masks()
    if masks is not None:
        missing, unknown = sorted(set(placed) - set(masks)), sorted(set(masks) - set(placed))
        if missing or unknown:
            raise ConfigError(f"AdaLoraConfig.rank_pattern does not fit the adapted modules: missing {missing[:3]}, "
                              f"unknown {unknown[:3]}")
        for name, keep in masks.items():
            placed[name].set_mask(torch.tensor(keep))
    return placed


def config_to_peft(cfg: AdaLoraConfig, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
    """PEFT's ``AdaLoraConfig`` fields. With the placed deltas, ``target_modules`` lists the adapted
    modules exactly. PEFT refuses a config without ``total_step`` even to load it for inference:
    unset, it is written as tinit + tfinal + 1, the smallest value PEFT accepts."""
    if placed is not None:
        targets, exclude, layers = sorted(n for n, d in placed.items() if isinstance(d, SvdLinear)), None, None
    else:
        targets = targets_to_peft(cfg.targets if cfg.targets is not None else DEFAULT_TARGETS, cfg.layers)
        exclude, layers = exclude_to_peft(cfg.exclude), (None if isinstance(targets, str) else cfg.layers)
    masks = cfg.masks()
    return {
        "peft_type": "ADALORA", "r": 8,  # PEFT ignores r for AdaLoRA (and warns unless it is its default, 8)
        "init_r": cfg.init_r, "target_r": cfg.target_r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.deltaT, "beta1": cfg.beta1, "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight,
        "total_step": cfg.total_step if cfg.total_step is not None else cfg.tinit + cfg.tfinal + 1,
        "rank_pattern": None if masks is None else {f"{n}.lora_E": keep for n, keep in masks.items()},
        "target_modules": targets, "exclude_modules": exclude, "layers_to_transform": layers, "layers_pattern": None,
        "modules_to_save": modules_to_save_to_peft(cfg.modules_to_save, placed),
        "fan_in_fan_out": any(isinstance(d, SvdLinear) and layer_info(d.base_layer).kind == "conv1d"
                              for d in (placed or {}).values()),
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True, "alpha_pattern": {},
        "task_type": None, "inference_mode": True, "base_model_name_or_path": None, "revision": None,
    }


#: PEFT fields that would change what an AdaLoRA adapter computes and that peftlab does not implement.
_PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
                     "loftq_config", "use_qalora")


def config_from_peft(d: dict[str, Any]) -> AdaLoraConfig:
    """Our config from PEFT's ADALORA fields (``rank_pattern`` keys ``<module>.lora_E[.<adapter>]``)."""
    bad = {n: d[n] for n in _PEFT_UNSUPPORTED if d.get(n)}
    if d.get("bias", "none") not in ("none", None) or not d.get("lora_alpha", 8) > 0:
        bad.update(bias=d.get("bias"), lora_alpha=d.get("lora_alpha"))
    if bad:
        raise ConfigError(f"PEFT fields {bad} are not supported for AdaLoRA (supported: bias 'none', lora_alpha > 0, "
                          f"none of {', '.join(_PEFT_UNSUPPORTED)})")
    alpha = d.get("lora_alpha", 8)
    pattern = d.get("rank_pattern")
    if pattern:
        masks = {}
        for key, keep in pattern.items():
            head, sep, _ = key.rpartition(".lora_E")
            masks[head if sep else key] = [bool(k) for k in keep]
        pattern = pattern_entries(masks)
    return AdaLoraConfig(
        init_r=int(d.get("init_r", 12)), target_r=int(d.get("target_r", 8)), alpha=alpha,
        dropout=float(d.get("lora_dropout", 0.0)), tinit=int(d.get("tinit", 0)), tfinal=int(d.get("tfinal", 0)),
        deltaT=int(d.get("deltaT", 1)), beta1=float(d.get("beta1", 0.85)), beta2=float(d.get("beta2", 0.85)),
        orth_reg_weight=float(d.get("orth_reg_weight", 0.5)), total_step=d.get("total_step"),
        rank_pattern=pattern or None,
        targets=targets_from_peft(d.get("target_modules")), exclude=targets_from_peft(d.get("exclude_modules")),
        layers=d.get("layers_to_transform"), modules_to_save=modules_to_save_from_peft(d),
    )


register_method(
    "adalora", AdaLoraConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="adalora[init_r=12,target_r=4,alpha=16,total_step=1000,tinit=100,tfinal=200]", default_lr=1e-2,
    peft=PeftFormat("ADALORA", read=config_from_peft, write=config_to_peft),
    training=AdaLoraTraining,
)
