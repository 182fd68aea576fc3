"""The LoRA family: LoRA, rsLoRA, DoRA, LoRA-FA, with gaussian / kaiming / PiSSA / OLoRA inits.

LoRA (Hu et al. 2021; seed 002 eq. 12):     h = W0 x + s · B A x,   A ∈ R^{r×in}, B ∈ R^{out×r}, B = 0
    s = α / r, or α / √r with rsLoRA (Kalajdzievski 2023).
DoRA (Liu et al. 2024; seed 002 eq. 17-18):  W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row,   m₀ = ‖W0‖_row
    computed as  h = W0 x + (m/n − 1) ⊙ W0 x + (m/n) ⊙ s B A x  with n = ‖W0 + s B A‖_row detached.
LoRA-FA (Zhang et al. 2023): A frozen (orthogonal random rows), only B trained; A's input is never
    kept for backward, which is where its memory saving comes from.
PiSSA / OLoRA: A, B start from the top-r SVD (resp. QR) factors of W0. Hugging Face PEFT overwrites W0
    with the residual W0 − s B₀A₀; we never touch the base (DESIGN.md principle 1) and subtract the
    frozen initial product instead: h = W0 x + s (B A − B₀ A₀) x. The function is the same, so files
    are interchangeable with PEFT (B₀A₀ is recomputed from W0 on load, as PEFT does).

Layers: ``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding`` and ``nn.Conv2d`` (DoRA: the linear ones).
Files use PEFT's key names (``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``,
``lora_embedding_A``, ``lora_embedding_B``) and config fields. Targeting that PEFT's fields cannot
say (a regex restricted to ``layers``) is folded into one regex; modules named in
``modules_to_save`` are never targeted, as in PEFT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.delta import Delta, HeadCopy, RecentCache
from peftlab.core.layers import is_adaptable_layer, layer_info, to_module_layout, weight_out_in
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import entry_matches, is_linear, select_modules

#: Query and value projections of the common architectures (Llama, BERT, GPT-2, T5, ViT).
DEFAULT_TARGETS = ["q_proj", "v_proj", "query", "value", "c_attn", "q", "v"]
INITS = ("kaiming", "gaussian", "pissa", "olora")
#: PEFT's ``task_type`` SEQ_CLS / TOKEN_CLS add both names to ``modules_to_save``, whichever the model
#: has; read back, they become this one entry, which matches either (and is written back as both).
PEFT_CLS_HEADS = ["classifier", "score"]
CLS_HEAD_ENTRY = r"re:(?:.*\.)?(?:classifier|score)"


@dataclass(kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA: rank ``r``, scale ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``), input dropout."""

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"

    def validate(self) -> None:
        self._check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", "a positive int")
        self._check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", "a positive number")
        self._check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        self._check(isinstance(self.rslora, bool), "rslora", "true or false")
        self._check(self.init in INITS, "init", f"one of {', '.join(INITS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``LoraConfig`` fields for this config.

        ``placed`` (module name -> delta of a placed adapter, when the caller has one) adds what only
        the model knows: ``fan_in_fan_out`` for GPT-2's ``Conv1D``, and the adapted modules' names
        where the targeting needs the model (``"all-linear"``, written as PEFT writes it: the resolved
        names; ``module_types``; the default targets, written as the entries that matched).
        Without it, ``"all-linear"`` with ``layers`` is written as is, which PEFT refuses loudly.
        """
        targets = self.targets if self.targets is not None else DEFAULT_TARGETS
        exclude, layers = self.exclude or None, self.layers
        lora = [n for n, d in (placed or {}).items() if isinstance(d, (LoraLinear, LoraEmbedding, LoraConv2d))]
        if placed is not None and ("all-linear" in targets or self.module_types is not None):
            target_modules: list[str] | str | None = sorted(lora)  # exact: selection already applied
            exclude = layers = None
        elif placed is not None and self.targets is None:
            target_modules = [e for e in DEFAULT_TARGETS if any(entry_matches(e, n) for n in lora)]
        else:
            target_modules = _targets_to_peft(targets, layers)
        if isinstance(target_modules, str) and target_modules != "all-linear":
            layers = None  # folded into the regex: PEFT refuses layers_to_transform with a regex
        fan_in_fan_out = any(
            isinstance(d, LoraLinear) and layer_info(d.base_layer).kind == "conv1d" for d in (placed or {}).values()
        )
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target_modules,
            "exclude_modules": _targets_to_peft(exclude) if exclude else None,
            "layers_to_transform": layers,
            "layers_pattern": None,
            "use_rslora": self.rslora,
            "use_dora": self.method == "dora",
            "init_lora_weights": {"kaiming": True}.get(self.init, self.init),
            "modules_to_save": _modules_to_save_to_peft(self.modules_to_save, placed),
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "rank_pattern": {},
            "alpha_pattern": {},
            "task_type": None,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
        }


@dataclass(kw_only=True)
class DoraConfig(LoraConfig):
    """DoRA: LoRA on the direction, plus a trainable magnitude per output row."""


@dataclass(kw_only=True)
class LoraFaConfig(LoraConfig):
    """LoRA-FA: A frozen at a random orthogonal init, only B is trained."""

    def validate(self) -> None:
        super().validate()
        self._check(self.init in ("kaiming", "gaussian"), "init", "kaiming or gaussian (A is frozen)")


def _targets_to_peft(entries: list[str] | None, layers: list[int] | None = None) -> list[str] | str | None:
    """Our entries as PEFT's ``target_modules``: a list of suffixes (``layers`` then go to PEFT's
    ``layers_to_transform``), or one regex if any is ``re:``, with ``layers`` folded in."""
    if entries is None:
        return None
    if entries == ["all-linear"]:
        return "all-linear"
    if not any(e.startswith("re:") or e == "all-linear" for e in entries):
        return list(entries)
    if "all-linear" in entries:
        raise ConfigError("targets: 'all-linear' cannot be combined with other entries in a PEFT file")
    alts = [e[3:] if e.startswith("re:") else rf"(?:.*\.)?{re.escape(e)}" for e in entries]
    return (_layers_lookahead(layers) if layers else "") + "(?:" + "|".join(alts) + ")"


def _layers_lookahead(layers: list[int]) -> str:
    """A regex lookahead that holds when a name's first all-digit part is in ``layers`` (peftlab's rule)."""
    alts = "|".join(str(i) for i in sorted(set(layers)))
    return rf"(?=(?:[^.]*[^.0-9][^.]*\.|\.)*0*(?:{alts})(?:\.|$))"


def _modules_to_save_to_peft(entries: list[str] | None, placed: Mapping[str, nn.Module] | None) -> list[str] | None:
    """PEFT's ``modules_to_save`` (plain names matched as suffixes: no regex)."""
    if entries is None:
        return None
    out: list[str] = []
    for e in entries:
        if e == CLS_HEAD_ENTRY:
            out += PEFT_CLS_HEADS
        elif e.startswith("re:") and placed is not None:
            out += [n for n, d in placed.items() if isinstance(d, HeadCopy) and entry_matches(e, n)]
        else:
            out.append(e)
    return list(dict.fromkeys(out))


def _targets_from_peft(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return ["all-linear"] if value.lower() == "all-linear" else ["re:" + value]
    return list(value)


#: PEFT fields that change what the adapter computes and that peftlab does not implement.
_PEFT_UNSUPPORTED = (
    "rank_pattern", "alpha_pattern", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "velora_config",
    "monteclora_config",
)
#: PEFT inits that leave the base weights alone: a loaded adapter's outputs do not depend on them.
_PEFT_PLAIN_INITS = {"eva": "kaiming", "orthogonal": "kaiming", "mica": "kaiming", "gaussian": "gaussian"}


def _init_from_peft(init: Any) -> str:
    if init in (True, False, None):
        return "kaiming"
    if isinstance(init, str) and init.lower() in ("pissa", "olora"):
        return init.lower()
    if isinstance(init, str) and init.lower() in _PEFT_PLAIN_INITS:
        return _PEFT_PLAIN_INITS[init.lower()]
    raise ConfigError(
        f"PEFT init_lora_weights={init!r} is not supported: PEFT rewrites the base weights with a residual that "
        "peftlab cannot recompute from the base alone (supported: true, false, gaussian, pissa, olora, eva, orthogonal)"
    )


def _modules_to_save_from_peft(d: dict[str, Any]) -> list[str] | None:
    names = list(dict.fromkeys(d.get("modules_to_save") or [])) or None
    if names and d.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and all(h in names for h in PEFT_CLS_HEADS):
        names = [n for n in names if n not in PEFT_CLS_HEADS] + [CLS_HEAD_ENTRY]
    return names


def _config_from_peft(d: dict[str, Any]) -> LoraConfig:
    for unsupported in _PEFT_UNSUPPORTED:
        if d.get(unsupported):
            raise ConfigError(f"PEFT field {unsupported} is not supported yet (got {d[unsupported]})")
    if d.get("bias", "none") not in ("none", None):
        raise ConfigError(f"PEFT field bias={d['bias']!r} is not supported yet (only 'none')")
    init = _init_from_peft(d.get("init_lora_weights", True))
    cls = DoraConfig if d.get("use_dora") else LoraConfig
    return cls(
        r=int(d["r"]),
        alpha=d.get("lora_alpha", 8),
        dropout=float(d.get("lora_dropout", 0.0)),
        rslora=bool(d.get("use_rslora", False)),
        init=init,
        targets=_targets_from_peft(d.get("target_modules")),
        exclude=_targets_from_peft(d.get("exclude_modules")),
        layers=d.get("layers_to_transform"),
        modules_to_save=_modules_to_save_from_peft(d),
    )




# -- math -----------------------------------------------------------------------------------------
class _DropoutThenLinear(torch.autograd.Function):
    """``F.linear(dropout(x), A)`` that keeps no dropped copy of x for backward.

    The mask is regenerated from a seed in backward (once, for both gradients), and x is saved only
    when A needs a gradient, so dropout costs no activation memory and LoRA-FA (frozen A) keeps
    nothing but A x. The 1/(1 − p) rescale is applied to the r-dim output, not to x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:  # type: ignore[override]
        ctx.p, ctx.seed = p, seed
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        if p == 0:
            return F.linear(x, weight)
        keep, scale = keep_mask(x.shape, x.device, p, seed)
        return F.linear(x * keep, weight) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        keep, scale = None, 1.0
        if ctx.p > 0:
            keep, scale = keep_mask((*grad.shape[:-1], weight.shape[1]), grad.device, ctx.p, ctx.seed)
            grad = grad * scale
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight if keep is None else (grad @ weight) * keep
        if ctx.needs_input_grad[1]:
            xd = x if keep is None else x * keep
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ xd.reshape(-1, xd.shape[-1])
        return grad_x, grad_w, None, None


def keep_mask(shape: Sequence[int], device: torch.device, p: float, seed: int) -> tuple[torch.Tensor, float]:
    """A dropout keep-mask of ``shape`` that depends only on (seed, shape, device), and the rescale
    1/P(keep).

    The mask compares 15-bit uniform integers with round(p · 2¹⁵), so P(drop) is p to within 2⁻¹⁶ and
    the rescale uses the exact P(keep): E[mask · scale] = 1. Four 15-bit draws come from one random
    int64 on CPU, about six times faster than ``bernoulli_`` (the mask is made twice per step).
    """
    threshold = min(round(p * 32768), 32767)
    gen = torch.Generator(device=device).manual_seed(seed)
    if torch.device(device).type == "cpu":
        n = math.prod(shape)
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(generator=gen)
        bits = words.view(torch.int16)[:n].view(tuple(shape)).bitwise_and_(0x7FFF)  # an int64's top bit is 0
    else:  # accelerators draw fast enough one int16 in [0, 2¹⁵) at a time
        bits = torch.empty(tuple(shape), dtype=torch.int16, device=device).random_(generator=gen)
    return bits >= threshold, 32768 / (32768 - threshold)


def lora_down(x: torch.Tensor, A: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """A · dropout(x), the memory-lean way when it matters (dropout, or a frozen A)."""
    use_fn = torch.is_grad_enabled() and (x.requires_grad or A.requires_grad) and ((training and p > 0) or not A.requires_grad)
    if use_fn:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return _DropoutThenLinear.apply(x, A, p if training else 0.0, seed)
    if training and p > 0:
        x = F.dropout(x, p, True)
    return F.linear(x, A)


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Δh = s · B A dropout(x) for x of shape (..., in); the scale is applied to the r-dim middle."""
    return F.linear(lora_down(x, A, p, training) * scaling, B)


# -- deltas ---------------------------------------------------------------------------------------
class LoraLinear(Delta):
    """LoRA on ``nn.Linear`` or ``Conv1D``: parallel site, Δh = s · B A x (− s · B₀ A₀ x for PiSSA/OLoRA)."""

    site = "parallel"
    merges_into = ("weight",)

    def __init__(self, base: nn.Module, cfg: LoraConfig):
        super().__init__()
        info = layer_info(base)
        self.__dict__["base_layer"] = base  # a reference, not a submodule: the base stays outside the adapter
        self.r, self.scaling, self.p = cfg.r, cfg.scaling, float(cfg.dropout)
        self.lora_A = nn.Linear(info.in_features, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, info.out_features, bias=False)
        self.residual = cfg.init in ("pissa", "olora")
        self.register_buffer("A0", None, persistent=False)
        self.register_buffer("B0", None, persistent=False)
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / cfg.r)
            elif cfg.method == "lora_fa":
                nn.init.orthogonal_(self.lora_A.weight)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
            if self.residual:
                A, B = _principal_factors(weight_out_in(base).float(), cfg)
                self.lora_A.weight.copy_(A)
                self.lora_B.weight.copy_(B)
                self.A0, self.B0 = A.clone(), B.clone()
        if cfg.method == "lora_fa":
            self.lora_A.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = s · B A dropout(x) (− s · B₀ A₀ x for PiSSA/OLoRA)."""
        out = self._lora_out(x.to(self.lora_A.weight.dtype), self.p)
        return out.to(x.dtype if y is None else y.dtype)

    def _lora_out(self, x: torch.Tensor, p: float) -> torch.Tensor:
        out = lora_delta(x, self.lora_A.weight, self.lora_B.weight, self.scaling, p, self.training)
        if self.residual:
            out = out - F.linear(F.linear(x, self.A0) * self.scaling, self.B0)
        return out

    def delta_out_in(self) -> torch.Tensor:
        """ΔW in (out, in) layout: s · (B A − B₀ A₀)."""
        dw = self.lora_B.weight @ self.lora_A.weight
        if self.residual:
            dw = dw - self.B0 @ self.A0
        return self.scaling * dw

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = s · (B A − B₀ A₀) in the module's own weight layout."""
        return {"weight": to_module_layout(base, self.delta_out_in().detach())}

    def rank(self) -> int:
        return 2 * self.r if self.residual else self.r

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Mixed batch as two gathered batched matmuls: row i uses (A_k, B_k, s_k) of its slot k.

        Ranks are zero-padded to the largest one; slot -1 gathers an all-zero adapter."""
        present = [d for d in deltas if d is not None]
        if not all(type(d) in (LoraLinear, DoraLinear) and not d.residual for d in present):
            return None
        dropout = {d.p if d.training else 0.0 for d in present}
        if len(dropout) > 1:
            return None  # different dropout rates per row: take the sub-batch path
        A_rows, B_rows, scale_rows, mag_rows = _gathered(deltas, slot, x.dtype, torch.is_grad_enabled())
        seq_shape = x.shape[1:-1]
        xf = x.reshape(x.shape[0], -1, x.shape[-1]).to(A_rows.dtype)  # (batch, tokens, in)
        if dropout != {0.0}:  # one mask over the batch is independent per row, as in the sub-batches
            xf = F.dropout(xf, dropout.pop(), training=True)
        h = torch.bmm(xf, A_rows.transpose(1, 2)) * scale_rows  # (batch, tokens, r)
        out = torch.bmm(h, B_rows.transpose(1, 2))  # (batch, tokens, out)
        if mag_rows is not None:  # DoRA rows: (m/n − 1) ⊙ W0 x + (m/n) ⊙ s B A x
            g = mag_rows  # (batch, 1, out)
            base_out = _without_bias(deltas, y).reshape(out.shape)
            out = (g - 1) * base_out + g * out
        return out.reshape(x.shape[0], *seq_shape, out.shape[-1]).to(y.dtype)


def _without_bias(deltas: Sequence[Delta | None], y: torch.Tensor) -> torch.Tensor:
    base = next(d for d in deltas if d is not None).base_layer  # type: ignore[union-attr]
    return y - base.bias if getattr(base, "bias", None) is not None else y


def _gathered(deltas: Sequence[Delta | None], slot: torch.Tensor, dtype: torch.dtype, grad: bool):
    """Per row: (A, B) of its slot (batch, r, in) and (batch, out, r), its scale (batch, 1, 1) and
    DoRA's magnitude ratio (batch, 1, out) or None. Without autograd the result is kept for later
    calls with the same ``slot`` tensor (the container reuses it for repeated adapter_names, so a
    decoding loop gathers once) while the stacks are unchanged."""
    stacks = _stacked(deltas, dtype, grad)
    holder = next(d for d in deltas if d is not None)
    cache = _recent(holder, "_gather_cache")
    hit = None if grad else cache.get(id(slot))
    if hit is not None and hit[0] is slot and hit[1] == slot._version and hit[2] is stacks:
        return hit[3]
    index = slot + 1
    A, B, scale, mag = stacks
    val = (
        A.index_select(0, index),
        B.index_select(0, index),
        scale.index_select(0, index).view(-1, 1, 1),
        mag.index_select(0, index).unsqueeze(1) if mag is not None else None,
    )
    if not grad:
        cache.put(id(slot), (slot, slot._version, stacks, val))  # the slot itself is held: ids stay unique
    return val


def _recent(holder: Delta, name: str) -> RecentCache:
    if name not in holder.__dict__:
        holder.__dict__[name] = RecentCache()
    return holder.__dict__[name]


def _stacked(deltas: Sequence[Delta | None], dtype: torch.dtype, grad: bool):
    """(A, B, scale, magnitude-ratio) stacked over slots with an all-zero slot 0 for base rows.

    Without autograd the stacks are kept (for the few most recent slot lists) until anything they
    are computed from changes (``_version_key``)."""
    present = [d for d in deltas if d is not None]
    key = tuple(_version_key(d) if d is not None else None for d in deltas)
    cache = _recent(present[0], "_stack_cache")
    if not grad:
        hit = cache.get(key)
        if hit is not None:
            return hit
    r = max(d.r for d in present)
    ref = present[0].lora_A.weight
    out_f, in_f = present[0].lora_B.weight.shape[0], ref.shape[1]
    zA, zB = ref.new_zeros(r, in_f), ref.new_zeros(out_f, r)
    As, Bs, scales, mags = [zA], [zB], [0.0], []
    any_dora = any(isinstance(d, DoraLinear) for d in present)
    ones = ref.new_ones(out_f)
    mags.append(ones)
    for d in deltas:
        if d is None:
            As.append(zA); Bs.append(zB); scales.append(0.0); mags.append(ones)  # noqa: E702
            continue
        As.append(F.pad(d.lora_A.weight, (0, 0, 0, r - d.r)))
        Bs.append(F.pad(d.lora_B.weight, (0, r - d.r)))
        scales.append(d.scaling)
        mags.append(d.magnitude_ratio() if isinstance(d, DoraLinear) else ones)
    val = (
        torch.stack(As),
        torch.stack(Bs),
        torch.tensor(scales, device=ref.device, dtype=ref.dtype),
        torch.stack(mags) if any_dora else None,
    )
    if not grad:
        cache.put(key, val)
    return val


def _version_key(d: Delta) -> tuple:
    """Changes whenever anything the stacks are computed from changes: A, B, and for DoRA the
    magnitude and the base weight (its norm), each by identity and in-place version."""
    # Plain dict lookups, not nn.Module attribute access: this runs for every adapter of a mixed
    # batch at every hooked module, once per decoding step.
    modules = d._modules
    tensors = [modules["lora_A"]._parameters["weight"], modules["lora_B"]._parameters["weight"]]
    if isinstance(d, DoraLinear):
        tensors += [d._parameters["lora_magnitude_vector"], d.base_layer.weight]
    return (id(d), d.scaling, *[(t.data_ptr(), t._version) for t in tensors])


class DoraLinear(LoraLinear):
    """DoRA: parallel site Δh = (m/n − 1) ⊙ (h − b) + (m/n) ⊙ s B A x, n = ‖W0 + s B A‖_row (detached)."""

    merge_uses_base = True

    def __init__(self, base: nn.Module, cfg: LoraConfig):
        super().__init__(base, cfg)
        with torch.no_grad():
            norm = self._weight_norm()
        self.lora_magnitude_vector = nn.Parameter(norm.clone())

    def _weight_norm(self) -> torch.Tensor:
        w = weight_out_in(self.base_layer).to(self.lora_A.weight.dtype)
        return torch.linalg.vector_norm(w + self.delta_out_in().detach(), dim=1)

    def magnitude_ratio(self) -> torch.Tensor:
        """m / ‖W0 + s B A‖_row, the norm detached as in the DoRA paper (§4.3)."""
        return self.lora_magnitude_vector / self._weight_norm()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = (m/n − 1) ⊙ (h − b) + (m/n) ⊙ s B A dropout(x), n = ‖W0 + s B A‖ per row (detached)."""
        assert y is not None
        g = self.magnitude_ratio()
        xa = x.to(g.dtype)
        if self.training and self.p > 0:
            # As PEFT: with dropout, the base term is recomputed on the same dropped input.
            xa = F.dropout(xa, self.p, True)
            base_out = F.linear(xa, weight_out_in(self.base_layer).to(g.dtype))
            lora = self._lora_out(xa, 0.0)
        else:
            base_out = _without_bias([self], y).to(g.dtype)
            lora = self._lora_out(xa, 0.0)
        return ((g - 1) * base_out + g * lora).to(y.dtype)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW = (m/n) ⊙ (W0 + s B A) − W0."""
        w = weight_out_in(base).to(self.lora_A.weight.dtype)
        new = self.magnitude_ratio().detach().unsqueeze(1) * (w + self.delta_out_in().detach())
        return {"weight": to_module_layout(base, new - w)}

    def changed_params(self, base: nn.Module) -> int:
        return base.weight.numel()


class LoraEmbedding(Delta):
    """LoRA on ``nn.Embedding``: Δh = s · B A[:, ids] (A = 0, B normal at init, as in PEFT)."""

    site = "parallel"
    merges_into = ("weight",)

    def __init__(self, base: nn.Embedding, cfg: LoraConfig):
        super().__init__()
        self.r, self.scaling = cfg.r, cfg.scaling
        self.padding_idx = base.padding_idx
        self.lora_embedding_A = nn.Parameter(torch.zeros(cfg.r, base.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, cfg.r))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = s · B A one_hot(x): the embedding lookup of Aᵀ, then B."""
        after_a = F.embedding(x, self.lora_embedding_A.T, padding_idx=self.padding_idx)
        out = (after_a @ self.lora_embedding_B.T) * self.scaling
        return out if y is None else out.to(y.dtype)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔE = s · (B A)ᵀ, shape (vocab, dim) as the embedding's weight."""
        return {"weight": (self.scaling * (self.lora_embedding_B @ self.lora_embedding_A)).T.detach()}

    def rank(self) -> int:
        return self.r


class LoraConv2d(Delta):
    """LoRA on ``nn.Conv2d``: A is a conv with the base's kernel (in → r), B a 1×1 conv (r → out)."""

    site = "parallel"
    merges_into = ("weight",)

    def __init__(self, base: nn.Conv2d, cfg: LoraConfig):
        super().__init__()
        if base.groups != 1:
            raise ConfigError("lora on grouped Conv2d is not supported")
        self.r, self.scaling, self.p = cfg.r, cfg.scaling, float(cfg.dropout)
        self.lora_A = nn.Conv2d(base.in_channels, cfg.r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
        self.lora_B = nn.Conv2d(cfg.r, base.out_channels, 1, bias=False)
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / cfg.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = s · conv_B(conv_A(dropout(x))), conv_A with the base's kernel, conv_B 1×1."""
        x = F.dropout(x, self.p, self.training) if self.p else x
        return self.lora_B(self.lora_A(x)) * self.scaling

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW[o, i, k, l] = s · Σ_r B[o, r] A[r, i, k, l]."""
        B = self.lora_B.weight.flatten(1)  # (out, r)
        return {"weight": self.scaling * torch.einsum("or,rikl->oikl", B, self.lora_A.weight).detach()}

    def rank(self) -> int:
        return self.r


def _principal_factors(w: torch.Tensor, cfg: LoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: A = √S_r U_rᵀ, B = V_r √S_r of the SVD of W0 / s; OLoRA: A = R[:r], B = Q[:, :r] of W0 = QR."""
    if cfg.init == "pissa":
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Sr = S[: cfg.r] / cfg.scaling
        return torch.diag(Sr.sqrt()) @ Uh[: cfg.r], V[:, : cfg.r] @ torch.diag(Sr.sqrt())
    Q, R = torch.linalg.qr(w)
    return R[: cfg.r].contiguous(), Q[:, : cfg.r].contiguous()


def _build(model: nn.Module, cfg: LoraConfig) -> dict[str, Delta]:
    if cfg.method == "dora":
        accept, what = is_linear, "Linear or Conv1D layer (DoRA)"
    elif cfg.init in ("pissa", "olora") or cfg.method == "lora_fa":
        accept, what = is_linear, f"Linear or Conv1D layer ({cfg.method}, init={cfg.init})"
    else:
        accept, what = is_adaptable_layer, "Linear, Conv1D, Embedding or Conv2d layer"
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=accept, what=what)
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
    return placed


# PEFT writes DoRA as LORA with use_dora=true: the one reader turns such files into DoraConfig.
register_method(
    "lora", LoraConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="lora[r=8,alpha=16,targets=q_proj|v_proj]", default_lr=3e-3,
    peft=PeftFormat("LORA", read=_config_from_peft, write=LoraConfig.to_peft),
)
register_method(
    "dora", DoraConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="dora[r=8,alpha=16]", default_lr=3e-3,
)
register_method(
    "lora_fa", LoraFaConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="lora_fa[r=8,alpha=16,init=gaussian]", default_lr=3e-3,
)
