"""FourierFT: fine-tuning in the Fourier domain (Gao et al. 2024, "Parameter-Efficient Fine-Tuning
with Discrete Fourier Transform"; Hugging Face PEFT's ``FOURIERFT``).

    ΔW = α · Re(IDFT2(S)),   S ∈ C^{out×in} sparse: S[u_j, v_j] = c_j for j = 1..n, zero elsewhere

    IDFT2(S)[p, q] = 1/(out·in) Σ_{u,v} S[u, v] · exp(2πi (u p / out + v q / in))

Only the n real coefficients c train; the frequencies (u_j, v_j) are fixed and random, drawn as PEFT
draws them so its files read the same: the first n entries of ``torch.randperm(out·in)`` from a CPU
generator seeded with ``seed`` (PEFT's ``random_loc_seed``), entry k at (k // in, k % in). The seed is
shared by the layers, so layers of one shape share their frequencies. n is capped at out·in per
layer (PEFT refuses a larger n; such layers are written to PEFT's ``n_frequency_pattern``).

h = W0 x + ΔW x, ΔW computed densely (torch.fft.ifft2) at each call, as PEFT does; it folds into the
base weight. c = 0 at init (``init=zeros``, the identity; PEFT's ``init_weights=true``) or N(0, 1)
(``init=gaussian``, PEFT's default ``init_weights=false``, which changes the model at init).

Files are PEFT's ``FOURIERFT`` format: ``base_model.model.<module>.fourierft_spectrum`` (n,).

Mixed batches: one matmul with the ΔW of every routed adapter stacked, then each row gathers the
output block of its own adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.delta import Delta
from peftlab.core.layers import layer_info, to_module_layout
from peftlab.core.peft_format import exclude_to_peft, modules_to_save_from_peft, modules_to_save_to_peft, targets_from_peft
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.targeting import is_linear, select_modules
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS
from peftlab.methods.reparam.vera import placed_targets

INITS = ("zeros", "gaussian")


@dataclass(kw_only=True)
class FourierFTConfig(AdapterConfig):
    """FourierFT: ``n_frequency`` coefficients per layer (capped at out·in), scale ``scaling`` (α),
    frequency ``seed``, and ``init`` of the coefficients (zeros: identity at init; gaussian: PEFT's default)."""

    n_frequency: int = 1000
    scaling: float = 150.0
    seed: int = 777
    init: str = "zeros"

    def validate(self) -> None:
        self._check(isinstance(self.n_frequency, int) and not isinstance(self.n_frequency, bool) and self.n_frequency > 0,
                    "n_frequency", "a positive int")
        self._check(isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool) and self.scaling != 0,
                    "scaling", "a nonzero number")
        self._check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "an int")
        self._check(self.init in INITS, "init", f"one of {', '.join(INITS)}")

    def to_peft(self, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
        """PEFT's ``FourierFTConfig`` fields; layers whose n is capped go to ``n_frequency_pattern``."""
        try:
            target_modules, layers = placed_targets(self, placed, FourierLinear, DEFAULT_TARGETS, exclude_field=True)
        except ConfigError:
            return {"peft_type": "PEFTLAB"}
        mine = {n: d for n, d in (placed or {}).items() if isinstance(d, FourierLinear)}
        return {
            "peft_type": "FOURIERFT", "n_frequency": self.n_frequency, "scaling": self.scaling,
            "random_loc_seed": self.seed, "init_weights": self.init == "zeros", "target_modules": target_modules,
            "exclude_modules": None if placed is not None else exclude_to_peft(self.exclude),
            "n_frequency_pattern": {_pattern_key(n): d.n for n, d in mine.items() if d.n != self.n_frequency},
            "fan_in_fan_out": any(d.kind == "conv1d" for d in mine.values()), "bias": "none",
            "layers_to_transform": layers, "layers_pattern": None,
            "modules_to_save": modules_to_save_to_peft(self.modules_to_save, placed),
            "task_type": None, "inference_mode": True, "base_model_name_or_path": None, "revision": None,
        }


def _pattern_key(name: str) -> str:
    """A key of PEFT's ``n_frequency_pattern`` selecting exactly module ``name`` (PEFT matches
    ``re.match(rf".*\\.{key}$", name)``): the name without its first part, escaped; a name without
    a dot needs the dot made optional and the match pinned to the start."""
    head, _, rest = name.partition(".")
    return re.escape(rest) if rest else "?(?<=^)" + re.escape(head)


def _config_from_peft(d: dict[str, Any]) -> FourierFTConfig:
    """Our config from PEFT's FOURIERFT fields. ``n_frequency_pattern`` is not kept: n per layer is
    min(n_frequency, out·in) here, and a file whose pattern says otherwise fails the shape check on loading."""
    if d.get("bias", "none") not in ("none", None):
        raise ConfigError(f"PEFT FOURIERFT field bias={d['bias']!r} is not supported (only 'none')")
    layers = d.get("layers_to_transform")
    return FourierFTConfig(
        n_frequency=int(d.get("n_frequency", 1000)), scaling=float(d.get("scaling", 150.0)),
        seed=int(d.get("random_loc_seed") if d.get("random_loc_seed") is not None else 777),
        init="zeros" if d.get("init_weights") else "gaussian", targets=targets_from_peft(d.get("target_modules")),
        exclude=targets_from_peft(d.get("exclude_modules")), layers=[layers] if isinstance(layers, int) else layers,
        modules_to_save=modules_to_save_from_peft(d),
    )


# -- math -----------------------------------------------------------------------------------------
def spectrum_indices(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) frequencies (rows u, columns v): the first n of a seeded permutation of the out·in entries."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


def fourier_weight(coeffs: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], scaling: float) -> torch.Tensor:
    """ΔW = α · Re(IDFT2(S)), S (out, in) zero but for S[u_j, v_j] = c_j."""
    dense = torch.zeros(shape, device=coeffs.device, dtype=torch.float32)
    dense[indices[0], indices[1]] = coeffs.float()
    return (torch.fft.ifft2(dense).real * scaling).to(coeffs.dtype)


class FourierLinear(Delta):
    """FourierFT on ``nn.Linear`` / ``Conv1D``: parallel site Δh = ΔW x, ΔW = α · Re(IDFT2(S))."""

    site = "parallel"
    merges_into = ("weight",)

    def __init__(self, base: nn.Module, cfg: FourierFTConfig):
        super().__init__()
        info = layer_info(base)
        self.kind, self.shape = info.kind, (info.out_features, info.in_features)
        self.n, self.scaling = min(cfg.n_frequency, info.out_features * info.in_features), float(cfg.scaling)
        self.register_buffer("indices", spectrum_indices(*self.shape, self.n, cfg.seed), persistent=False)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(self.n) if cfg.init == "zeros" else torch.randn(self.n))

    def delta_out_in(self) -> torch.Tensor:
        """ΔW in (out, in) layout."""
        return fourier_weight(self.fourierft_spectrum, self.indices, self.shape, self.scaling)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δh = ΔW x."""
        dw = self.delta_out_in()
        return F.linear(x.to(dw.dtype), dw).to(x.dtype if y is None else y.dtype)

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """ΔW in the module's own weight layout."""
        return {"weight": to_module_layout(base, self.delta_out_in().detach())}

    def rank(self) -> int:
        """Upper bound: each frequency adds Re(f_u g_vᵀ) = cos cosᵀ − sin sinᵀ, of rank ≤ 2."""
        return min(2 * self.n, *self.shape)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Mixed batch: one matmul with [0; ΔW_1; ...; ΔW_K] (every adapter's output side by side),
        then row i gathers the block of its slot (the zero block for −1)."""
        present = [d for d in deltas if d is not None]
        if not all(type(d) is FourierLinear for d in present):
            return None
        ws = [d.delta_out_in() if d is not None else None for d in deltas]
        zero = torch.zeros_like(next(w for w in ws if w is not None))
        stacked = torch.stack([zero] + [zero if w is None else w for w in ws])  # (K + 1, out, in)
        h = F.linear(x.to(stacked.dtype), stacked.flatten(0, 1))
        h = h.view(*h.shape[:-1], stacked.shape[0], stacked.shape[1])  # (batch, ..., K + 1, out)
        index = (slot + 1).view(-1, *([1] * (h.dim() - 1))).expand(*h.shape[:-2], 1, h.shape[-1])
        return h.gather(-2, index).squeeze(-2).to(y.dtype)


def _build(model: nn.Module, cfg: FourierFTConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    return {name: FourierLinear(m, cfg) for name, m in modules.items()}


register_method(
    "fourierft", FourierFTConfig, _build, family="reparam", sites=("parallel",), merges=True, per_row=True,
    example="fourierft[n_frequency=1000,scaling=150,targets=q_proj|v_proj]", default_lr=1e-2,
    peft=PeftFormat("FOURIERFT", read=_config_from_peft, write=FourierFTConfig.to_peft),
)
