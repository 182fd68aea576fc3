"""LoftQ: a LoRA init that absorbs the quantization error of a 4-bit base (Li et al. 2023, Alg. 1).

A quantized base multiplies by Q = q_N(W) instead of W. LoftQ picks Q and the LoRA factors together
so that the adapted layer starts close to the float one, min ‖W − Q − s·B A‖_F, by alternating

    Q_t      = q_N(W − s·B_{t−1} A_{t−1})          (B_0 A_0 = 0: Q_1 = q_N(W), a plain quantization)
    s·B_t A_t = SVD_r(W − Q_t)                     (the best rank-r approximation of the residual)

for t = 1..T (``loftq_iter``). With A = √S_r V_rᵀ / √s and B = U_r √S_r / √s, s·B A is the rank-r
truncation U_r S_r V_rᵀ of W − Q_T, so ‖W − Q_T − s·B_T A_T‖ < ‖W − Q_T‖ unless the residual is 0.

As Hugging Face PEFT's ``peft/utils/loftq_utils.py::loftq_init``, except: the scale s is divided
out of the factors (PEFT sets B A = SVD_r(W − Q) and its forward multiplies by s, exact only for
α = r), and Q is quantized exactly as the base layer stores it (NF4 with double quantization,
``core/quantized.roundtrip``; PEFT's LoftQ quantizes without double quantization), so the Q used
here is the layer's own. With T = 1 (PEFT's default) Q_1 is what quantizing the float model gives,
so a LoftQ adapter loads onto any freshly quantized copy of the base; with T > 1 the base stores
q_N(W − s·B_{T−1}A_{T−1}) and that quantized base must be kept with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from peftlab.core.quantized import roundtrip


@dataclass
class LoftQFactors:
    """What LoftQ chose for one layer: the matrix to store in 4-bit (``source``; Q = q_N(source)),
    Q itself (dequantized), and the LoRA factors A (r, in), B (out, r)."""

    source: torch.Tensor
    q: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor


def low_rank(res: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B A = SVD_r(res), the rank-r truncation U_r S_r V_rᵀ, split evenly:
    A = √S_r V_rᵀ / √s, B = U_r √S_r / √s."""
    U, S, Vh = torch.linalg.svd(res, full_matrices=False)
    root = (S[:r] / scaling).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


@torch.no_grad()
def loftq_factors(
    w: torch.Tensor, r: int, scaling: float, iters: int = 1,
    quantize: Callable[[torch.Tensor], torch.Tensor] = roundtrip,
) -> LoftQFactors:
    """LoftQ's alternation (module docstring) on the float (out, in) weight ``w``, computed in
    float32 on ``w``'s device; ``quantize(m)`` is q_N (quantize then dequantize)."""
    if iters < 1:
        raise ValueError(f"loftq: iters={iters} must be >= 1")
    w = w.detach().float()
    source = w
    for t in range(iters):
        q = quantize(source).float()
        A, B = low_rank(w - q, r, scaling)
        if t + 1 < iters:
            source = w - scaling * (B @ A)
    return LoftQFactors(source=source, q=q, A=A, B=B)


def quantization_error(w: torch.Tensor, q: torch.Tensor, A: torch.Tensor | None = None, B: torch.Tensor | None = None,
                       scaling: float = 1.0) -> float:
    """‖W − Q − s·B A‖_F (‖W − Q‖_F without factors, i.e. LoRA's B = 0 init)."""
    res = w.float() - q.float()
    if A is not None and B is not None:
        res = res - scaling * (B.float() @ A.float())
    return torch.linalg.matrix_norm(res).item()
