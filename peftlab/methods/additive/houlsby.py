"""Sequential bottleneck adapter (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
seed 001 §6.1, seed 000 III-A1, seed 002 §3.1.1).

One adapter after the attention output projection and one after the FFN output projection of every
block (before the residual connection and LayerNorm), output site:

    y ← y + W_up σ(W_down y + b_down) + b_up,     W_down ∈ R^{m×d}, W_up ∈ R^{d×m},  m = d / reduction_factor

W_up and b_up start at zero, so the adapted model is the base model at init. σ is ReLU, GELU or SiLU.
The adapter is nonlinear in y, so it cannot be folded into the base weights (``merge()`` refuses).
Hugging Face PEFT has no Houlsby adapter: files use our own keys, ``adapter_down.{weight,bias}`` and
``adapter_up.{weight,bias}`` under ``base_model.model.<module>``.

Not implemented: the optional training of the block's LayerNorms that the paper also does (combine
with a LayerNorm-tuning adapter for that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig
from peftlab.core.delta import Delta, per_row
from peftlab.core.layers import layer_info
from peftlab.core.registry import register_method
from peftlab.core.targeting import is_linear, select_modules

#: Attention-output and FFN-output projections of BERT, Llama, GPT-2, T5 and ViT. BERT's FFN output
#: ``encoder.layer.N.output.dense`` is named by a regex so that the suffix ``output.dense`` does not
#: also mean ``attention.output.dense``: every block gets exactly one adapter per sublayer.
DEFAULT_TARGETS = [
    "attention.output.dense",  # BERT, RoBERTa (and ViT before transformers 5): attention output
    r"re:(?:.*\.)?\d+\.output\.dense",  # BERT, RoBERTa (and ViT before transformers 5): FFN output
    "o_proj", "down_proj",  # Llama, Mistral, Qwen; ViT's o_proj (transformers 5)
    "mlp.fc2",  # ViT (transformers 5), CLIP, Phi
    "attn.c_proj", "mlp.c_proj",  # GPT-2
    "SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo",  # T5
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@dataclass(kw_only=True)
class HoulsbyConfig(AdapterConfig):
    """Bottleneck size ``r`` (if given) or ``d // reduction_factor``; activation relu | gelu | silu."""

    reduction_factor: float = 16
    r: int | None = None
    activation: str = "relu"

    def validate(self) -> None:
        rf = self.reduction_factor
        self._check(isinstance(rf, (int, float)) and not isinstance(rf, bool) and rf > 0, "reduction_factor",
                    "a positive number")
        self._check(self.r is None or (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0),
                    "r", "a positive int or none")
        self._check(self.activation in ACTIVATIONS, "activation", f"one of {', '.join(ACTIVATIONS)}")

    def bottleneck(self, d: int) -> int:
        return self.r if self.r is not None else max(1, int(d // self.reduction_factor))


def bottleneck_adapter(y: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                       b_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """y + W_up σ(W_down y + b_down) + b_up for y of shape (..., d)."""
    return y + F.linear(act(F.linear(y, w_down, b_down)), w_up, b_up)


class HoulsbyAdapter(Delta):
    """Output site: y ← y + up(σ(down(y))), up = 0 at init."""

    site = "output"

    def __init__(self, base: nn.Module, cfg: HoulsbyConfig):
        super().__init__()
        d = layer_info(base).out_features
        self.r = cfg.bottleneck(d)
        self.activation = cfg.activation
        self.adapter_down = nn.Linear(d, self.r)
        self.adapter_up = nn.Linear(self.r, d)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y + W_up σ(W_down y + b_down) + b_up."""
        assert y is not None
        w = self.adapter_down.weight
        out = bottleneck_adapter(y.to(w.dtype), w, self.adapter_down.bias, self.adapter_up.weight,
                                 self.adapter_up.bias, ACTIVATIONS[self.activation])
        return out.to(y.dtype)

    @classmethod
    def forward_routed(
        cls, deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Mixed batch as two gathered batched matmuls: row i uses the down/up weights of its slot.

        Bottlenecks are zero-padded to the widest; a zero row (slot −1, or padding) adds σ(0)·0 = 0,
        since every activation here has σ(0) = 0. Adapters with different activations are not
        batched (the dispatcher then runs one sub-batch per adapter)."""
        present = [d for d in deltas if d is not None]
        if y is None or len({d.activation for d in present}) != 1:  # type: ignore[union-attr]
            return None
        r = max(d.r for d in present)  # type: ignore[union-attr]
        ref = present[0].adapter_down  # type: ignore[union-attr]
        d_model = ref.weight.shape[1]

        def padded(d: HoulsbyAdapter) -> tuple[torch.Tensor, ...]:  # bottleneck zero-padded to r
            extra = r - d.r
            return (F.pad(d.adapter_down.weight, (0, 0, 0, extra)), F.pad(d.adapter_down.bias, (0, extra)),
                    F.pad(d.adapter_up.weight, (0, extra)), d.adapter_up.bias)

        new = ref.weight.new_zeros
        zeros = (new(r, d_model), new(r), new(d_model, r), new(d_model))
        parts = [padded(d) if d is not None else None for d in deltas]  # type: ignore[arg-type]
        down_w, down_b, up_w, up_b = (per_row([q[i] if q else None for q in parts], slot, z) for i, z in enumerate(zeros))
        yf = y.reshape(y.shape[0], -1, d_model).to(ref.weight.dtype)  # (batch, tokens, d)
        act = ACTIVATIONS[present[0].activation]  # type: ignore[union-attr]
        h = act(torch.baddbmm(down_b.unsqueeze(1), yf, down_w.transpose(1, 2)))  # (batch, tokens, r)
        out = yf + torch.baddbmm(up_b.unsqueeze(1), h, up_w.transpose(1, 2))
        return out.reshape(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def _build(model: nn.Module, cfg: HoulsbyConfig) -> dict[str, Delta]:
    modules = select_modules(model, cfg, default=DEFAULT_TARGETS, accept=is_linear, what="Linear or Conv1D layer")
    return {name: HoulsbyAdapter(module, cfg) for name, module in modules.items()}


register_method(
    "houlsby", HoulsbyConfig, _build, family="additive", sites=("output",), merges=False, per_row=True,
    example="houlsby[reduction_factor=16,activation=relu]", default_lr=2e-3,
)
