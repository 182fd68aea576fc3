"""Merging trained adapters into a new one: weighted sums, task arithmetic, TIES, DARE (GitHub issue 9).

``merge(pm, ["a", "b"], [0.5, 0.5], method="ties", name="ab", density=0.5)`` adds adapter ``"ab"``
to ``pm``; the sources stay as they were. Two ways to combine, chosen from the sources:

Weight space (every source is a reparameterized method, ``family="reparam"``: LoRA, DoRA, LoRA-FA,
LoHa, LoKr, OFT, BOFT, VeRA, FourierFT, DyLoRA, AdaLoRA; whatever their ranks). Per module, ΔWᵢ is
what merging adapter i would add to the weight (``Delta.delta_params``), in (out, in) layout; a
module that a source does not adapt has ΔWᵢ = 0. The result is a LoRA adapter with scale 1
(``alpha = r``, as Hugging Face PEFT's ``add_weighted_adapter``) and ``B A`` =

    linear, task_arithmetic   Σ wᵢ ΔWᵢ exactly: A = [A₁; A₂; …], B = [w₁B₁, w₂B₂, …] with ΔWᵢ = Bᵢ Aᵢ
                              exact factors (PEFT's ``cat``); r = Σ rᵢ (Ilharco et al. 2023)
    svd                       Σ wᵢ ΔWᵢ truncated to rank ``rank`` (PEFT's ``svd``)
    ties                      TIES (Yadav et al. 2023) on the ΔWᵢ, then rank ``rank`` (PEFT's ``ties_svd``)
    dare                      DARE (Yu et al. 2024): Σ wᵢ mᵢ ⊙ ΔWᵢ / d, mᵢ ~ Bernoulli(d) seeded, then
                              rank ``rank`` (PEFT's ``dare_linear_svd``)
    dare_ties                 DARE's drop and rescale, then TIES' sign election and disjoint mean

(``rank`` defaults to the largest declared rank of the sources' ΔW, as PEFT's ``svd_rank``; the
factors of a rank-k truncation are PEFT's: B = U_k S_k, A = V_kᵀ.) PEFT's own ``linear`` / ``ties``
combine the factors A and B separately, which is not Σ wᵢ ΔWᵢ; here every method works on ΔW.

Parameters (any other method, e.g. ia3, houlsby, pfeiffer, bitfit, prefix): only ``linear`` and
``task_arithmetic``, between adapters of one method and one config (parameters of identical
shape). The result has that config and θ = θ₀ + Σ wᵢ (θᵢ − θ₀) for each trained parameter: θ₀ is
a fresh adapter's value for methods that merge (their ΔW vanishes there and is linear in θ: IA3's
vectors, the selective methods' tuned copies, so again ΔW = Σ wᵢ ΔWᵢ exactly), and θ₀ = 0 for the
others (θ = Σ wᵢ θᵢ, PEFT's rule for IA3; an average of parameters when Σ wᵢ = 1).
Frozen parameters are copied from the first source.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from peftlab.core.config import config_parts
from peftlab.core.delta import HeadCopy
from peftlab.core.layers import is_adaptable_layer, layer_info
from peftlab.core.model import PeftModel, build_placement
from peftlab.core.registry import get_method
from peftlab.methods.reparam.lora import LoraConfig, LoraConv2d, LoraEmbedding

#: Every merging method; the last four need weight-space sources and give a rank-``rank`` LoRA.
METHODS = ("linear", "task_arithmetic", "svd", "ties", "dare", "dare_ties")
TRUNCATED = ("svd", "ties", "dare", "dare_ties")
SIGN_METHODS = ("total", "frequency")


# -- the math, on one module's task tensors ------------------------------------------------------
def task_arithmetic(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σᵢ wᵢ ΔWᵢ (Ilharco et al. 2023, "Editing models with task arithmetic"; negative wᵢ negate)."""
    out = weights[0] * deltas[0]
    for w, d in zip(weights[1:], deltas[1:]):
        out = out + w * d
    return out


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the k = ⌊density · numel⌋ entries of largest |ΔW|, zero the rest."""
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[delta.abs().reshape(-1).topk(k).indices] = 1
    return delta * mask.view_as(delta)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop and rescale (Yu et al. 2024): m ⊙ ΔW / d with m ~ Bernoulli(d) drawn from
    ``generator`` (on the CPU, so a seed gives the same mask on every device); d = 1 − p."""
    keep = torch.bernoulli(torch.full(delta.shape, density), generator=generator).to(delta.device, delta.dtype)
    return delta * keep / density


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' sign election over tasks (dim 0): γ = sgn(Σᵢ τᵢ) ("total") or sgn(Σᵢ sgn τᵢ)
    ("frequency"), +1 on ties; returns the mask sgn(τᵢ) = γ (zero entries never agree)."""
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)


def disjoint_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float], method: str = "total") -> torch.Tensor:
    """TIES' elect and disjoint merge of (trimmed) ΔWᵢ: Σᵢ wᵢ ΔWᵢ [sgn ΔWᵢ = γ] / max(1, #{i: sgn ΔWᵢ = γ}),
    the sign elected on the unweighted ΔWᵢ (as PEFT's ``ties``)."""
    stacked = torch.stack(list(deltas))
    agree = elect_sign(stacked, method)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, method: str = "total") -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each ΔWᵢ to ``density``, elect the sign, disjoint mean."""
    return disjoint_mean([trim(d, density) for d in deltas], weights, method)


def dare(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024): Σᵢ wᵢ · m ⊙ ΔWᵢ / d, each ΔWᵢ with its own Bernoulli(d) mask."""
    return task_arithmetic([dare_drop(d, density, generator) for d in deltas], weights)


def dare_ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, generator: torch.Generator,
              method: str = "total") -> torch.Tensor:
    """DARE's drop and rescale, then TIES' sign election and disjoint mean."""
    return disjoint_mean([dare_drop(d, density, generator) for d in deltas], weights, method)


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-``rank`` approximation of ΔW (Eckart-Young): ΔW = U S Vᵀ,
    B = U_k S_k (out, rank), A = V_kᵀ (rank, in), zero-padded when rank > min(out, in) (PEFT's split)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    b, a = delta.new_zeros(delta.shape[0], rank), delta.new_zeros(rank, delta.shape[1])
    b[:, :k] = (u[:, :k] * s[:k]).to(delta.dtype)
    a[:k] = vh[:k].to(delta.dtype)
    return b, a


def exact_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A = ΔW up to float32 rounding: the SVD truncated at ΔW's numerical rank (singular
    values above σ₁ · max(out, in) · ε_float32, the float32 analogue of ``torch.linalg.matrix_rank``)."""
    s = torch.linalg.svdvals(delta.double())
    tol = (s[0] if s.numel() else 0.0) * max(delta.shape) * torch.finfo(torch.float32).eps
    return truncated_factors(delta, int((s > tol).sum()))


def concat_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """B = [w₁B₁, w₂B₂, …], A = [A₁; A₂; …], so that B A = Σ wᵢ Bᵢ Aᵢ (PEFT's ``cat``)."""
    return torch.cat([w * b for (b, _), w in zip(factors, weights)], 1), torch.cat([a for _, a in factors], 0)


def combine_parameters(params: Sequence[torch.Tensor], weights: Sequence[float], origin: torch.Tensor | None) -> torch.Tensor:
    """θ₀ + Σᵢ wᵢ (θᵢ − θ₀) (θ₀ = ``origin``, or 0 when None: Σᵢ wᵢ θᵢ)."""
    if origin is None:
        return task_arithmetic(params, weights)
    return origin + task_arithmetic([p - origin for p in params], weights)


# -- the container side ---------------------------------------------------------------------------
def _out_in(base: nn.Module, dp: torch.Tensor) -> torch.Tensor:
    """A weight delta in the base module's layout, as (out, in) (Conv1D, Embedding: transposed;
    Conv2d: flattened), float32."""
    kind = layer_info(base).kind
    dp = dp.detach().float()
    return dp.T if kind in ("conv1d", "embedding") else dp.flatten(1) if kind == "conv2d" else dp


def _reparam_parts(pm: PeftModel, name: str) -> list[bool]:
    """For each part of adapter ``name``'s config: whether its method is reparameterized."""
    return [get_method(p.method).family == "reparam" for p in config_parts(pm.configs[name])]


def _weight_problem(pm: PeftModel, name: str) -> str | None:
    """Why adapter ``name`` has no weight-space ΔW (None when it has one)."""
    if not all(_reparam_parts(pm, name)):
        return f"{name!r} is not (only) a reparameterized method"
    for _, module_name, delta in pm.placements[name]:
        base = pm.model.get_submodule(module_name) if module_name else pm.model
        if isinstance(delta, HeadCopy):
            return f"{name!r} has a trained copy of {module_name!r} (modules_to_save), which merging cannot combine"
        if tuple(getattr(delta, "merges_into", ())) != ("weight",) or not is_adaptable_layer(base):
            return f"{name!r} has a {type(delta).__name__} at {module_name or 'the model level'!r}, which is not a weight delta ΔW"
    return None


def _weight_deltas(pm: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """{module: ΔW (out, in)} of a weight-space adapter (deltas at one module summed)."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _, module_name, delta in pm.placements[name]:
            base = pm.model.get_submodule(module_name)
            dw = _out_in(base, delta.delta_params(base)["weight"])
            out[module_name] = out[module_name] + dw if module_name in out else dw
    return out


def _set_factors(delta: nn.Module, b: torch.Tensor, a: torch.Tensor) -> None:
    """Write B (out, r) and A (r, in) into a LoRA delta of any layer kind."""
    if isinstance(delta, LoraEmbedding):
        pairs = [(delta.lora_embedding_B, b), (delta.lora_embedding_A, a)]
    else:
        pairs = [(delta.lora_B.weight, b), (delta.lora_A.weight, a)]
    for p, v in pairs:
        p.copy_(v.reshape(p.shape) if isinstance(delta, LoraConv2d) else v)


def _merge_weights(pm: PeftModel, adapters: list[str], weights: list[float], method: str, rank: int | None,
                   density: float | None, seed: int, majority_sign: str):
    deltas = [_weight_deltas(pm, a) for a in adapters]
    modules = [m for m in dict.fromkeys(m for d in deltas for m in d)]
    if rank is None and method in TRUNCATED:
        rank = max((d.rank() or 0) for a in adapters for _, _, d in pm.placements[a]) or None
        if rank is None:
            raise ValueError(f"merge(method={method!r}): the sources declare no rank; give rank=")
    gen = torch.Generator().manual_seed(seed)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in modules:
        ref = next(d[m] for d in deltas if m in d)
        dws = [d.get(m, torch.zeros_like(ref)) for d in deltas]
        if method in ("linear", "task_arithmetic"):
            factors[m] = concat_factors([exact_factors(dw) for dw in dws], weights)
            continue
        if method == "svd":
            total = task_arithmetic(dws, weights)
        elif method == "ties":
            total = ties(dws, weights, density, majority_sign)  # type: ignore[arg-type]
        elif method == "dare":
            total = dare(dws, weights, density, gen)  # type: ignore[arg-type]
        else:
            total = dare_ties(dws, weights, density, gen, majority_sign)  # type: ignore[arg-type]
        factors[m] = truncated_factors(total, rank)  # type: ignore[arg-type]
    r = max(1, max(b.shape[1] for b, _ in factors.values()))
    cfg = LoraConfig(r=r, alpha=r, targets=modules)
    placement = build_placement(pm.model, cfg)
    with torch.no_grad():
        for _, module_name, delta in placement:
            b, a = factors[module_name]
            pad = r - b.shape[1]
            _set_factors(delta, torch.nn.functional.pad(b, (0, pad)), torch.nn.functional.pad(a, (0, 0, 0, pad)))
    return cfg, placement


def _config_difference(pm: PeftModel, a: str, b: str) -> str | None:
    da, db = pm.configs[a].to_dict(), pm.configs[b].to_dict()
    if da == db:
        return None
    diff = [k for k in dict.fromkeys([*da, *db]) if da.get(k) != db.get(k)]
    return ", ".join(f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in diff)


def _merge_parameters(pm: PeftModel, adapters: list[str], weights: list[float]):
    cfg = copy.deepcopy(pm.configs[adapters[0]])
    placement = build_placement(pm.model, cfg)
    merges = all(get_method(p.method).merges for p in config_parts(cfg))
    fresh = nn.ModuleList([d for _, _, d in placement])
    sources = [dict(nn.ModuleList([d for _, _, d in pm.placements[a]]).named_parameters()) for a in adapters]
    trained = {id(p): flag for p, flag in pm.adapter_parameters(adapters[0])}
    with torch.no_grad():
        for pname, p in fresh.named_parameters():
            params = [s[pname] for s in sources]
            if not trained.get(id(params[0]), True):
                p.copy_(params[0])
                continue
            p.copy_(combine_parameters([q.to(p.dtype) for q in params], weights, p.clone() if merges else None))
    return cfg, placement


def _check(pm: PeftModel, adapters: Sequence[str], weights: Sequence[float], method: str, name: str,
           rank: int | None, density: float | None, majority_sign: str) -> None:
    if method not in METHODS:
        raise ValueError(f"merge: unknown method {method!r}; methods: {', '.join(METHODS)}")
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"merge: adapters must be a non-empty list of adapter names, got {adapters!r}")
    pm._require(adapters)
    twice = sorted({a for a in adapters if list(adapters).count(a) > 1})
    if twice:
        raise ValueError(f"merge: adapter(s) {twice} listed more than once; list each once with its total weight")
    if len(weights) != len(adapters):
        raise ValueError(f"merge: {len(weights)} weights for {len(adapters)} adapters {list(adapters)}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"merge: weights must be finite numbers, got {list(weights)}")
    if name in adapters:
        raise ValueError(f"merge: the new adapter's name {name!r} is one of the sources {list(adapters)}; "
                         "the sources are kept, so choose a new name")
    pm._check_new_name(name)
    if pm._state.merged:
        raise RuntimeError(f"merge: adapters {pm._state.merged} are merged into the base weights; unmerge() first")
    if rank is not None:
        if method not in TRUNCATED:
            raise ValueError(f"merge: rank= applies to {', '.join(TRUNCATED)}; {method!r} is exact (its rank is the sum)")
        if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
            raise ValueError(f"merge: rank={rank!r} is invalid: expected a positive int")
    uses_density = method in ("ties", "dare", "dare_ties")
    if uses_density and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"merge(method={method!r}) needs density= in (0, 1], the fraction of ΔW entries kept; got {density!r}")
    if not uses_density and density is not None:
        raise ValueError(f"merge: density= applies to ties, dare, dare_ties, not {method!r}")
    if majority_sign not in SIGN_METHODS:
        raise ValueError(f"merge: majority_sign={majority_sign!r} is invalid: expected one of {SIGN_METHODS}")


def merge(pm: PeftModel, adapters: Sequence[str], weights: Sequence[float], method: str = "linear", *, name: str,
          rank: int | None = None, density: float | None = None, seed: int = 0, majority_sign: str = "total") -> str:
    """Add adapter ``name`` to ``pm``, a combination of ``adapters`` with ``weights`` (see the
    module docstring for each ``method``); the sources are unchanged and the new adapter is not
    activated. ``rank``: the result's rank for svd / ties / dare / dare_ties; ``density``: the
    fraction of ΔW entries kept by ties / dare / dare_ties (DARE drops p = 1 − density);
    ``seed``: DARE's masks; ``majority_sign``: TIES' election, ``"total"`` or ``"frequency"``.

    Every check runs before ``pm`` is touched: an unknown method or adapter, a weight count that
    differs from the adapter count, a source listed twice, a name that exists (a source's too),
    options the method does not use, or sources that cannot combine raise and leave ``pm`` as it was.
    Returns ``name``."""
    adapters, weights = list(adapters), list(weights)
    _check(pm, adapters, weights, method, name, rank, density, majority_sign)
    weights = [float(w) for w in weights]
    kinds = ", ".join(f"{a!r}: {pm.configs[a].to_string()}" for a in adapters)
    rule = ("linear, task_arithmetic, svd, ties, dare and dare_ties combine the weight deltas ΔW of reparameterized "
            "methods (lora, dora, lora_fa, loha, lokr, oft, boft, vera, fourierft, dylora, adalora), whatever their "
            "ranks; other methods combine only by linear or task_arithmetic on the parameters, between adapters "
            "of one method and one config")
    reparam = [any(_reparam_parts(pm, a)) for a in adapters]
    if any(reparam):
        problems = [p for p in (_weight_problem(pm, a) for a in adapters) if p]
        if problems:
            raise ValueError(f"merge: cannot combine {kinds} by {method!r}: {problems[0]}. {rule}")
        pm._follow_base(everywhere=True)
        cfg, placement = _merge_weights(pm, adapters, weights, method, rank, density, seed, majority_sign)
    else:
        if method in TRUNCATED:
            raise ValueError(f"merge: cannot combine {kinds} by {method!r}: they have no weight delta ΔW. {rule}")
        for other in adapters[1:]:
            diff = _config_difference(pm, adapters[0], other)
            if diff:
                raise ValueError(f"merge: cannot combine {kinds}: their configs differ ({diff}), so their parameters "
                                 f"differ in place or shape. {rule}")
        cfg, placement = _merge_parameters(pm, adapters, weights)
    pm._install(name, cfg, placement)
    return name
