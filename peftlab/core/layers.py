"""What a delta needs to know about the layer it sits on: shapes and weight layout.

Deltas work in one layout, ``(out_features, in_features)`` as ``nn.Linear`` stores it. GPT-2's
``Conv1D`` stores the transpose; this module converts so no method needs a special case.
A bitsandbytes 4-bit ``Linear4bit`` (an ``nn.Linear`` subclass) is a ``"linear"`` layer too: its
weight is read dequantized (``core/quantized.py``), so methods that need W0 (DoRA's norm, PiSSA,
OFT, merging) work on it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.quantized import dequantize, is_4bit, requantize


@dataclass(frozen=True)
class LayerInfo:
    """What a delta needs to know of a base layer: its kind and its input/output sizes."""

    kind: str  # "linear" | "conv1d" (GPT-2, transposed) | "embedding" | "conv2d"
    in_features: int
    out_features: int


def layer_info(module: nn.Module) -> LayerInfo:
    """Shapes of a supported layer; ``TypeError`` naming the class for anything else."""
    if isinstance(module, nn.Linear):
        return LayerInfo("linear", module.in_features, module.out_features)
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is (in, out)
        w = module.weight
        return LayerInfo("conv1d", w.shape[0], w.shape[1])
    if isinstance(module, nn.Embedding):
        return LayerInfo("embedding", module.num_embeddings, module.embedding_dim)
    if isinstance(module, nn.Conv2d):
        return LayerInfo("conv2d", module.in_channels, module.out_channels)
    raise TypeError(f"unsupported layer type {type(module).__name__}; supported: Linear, Conv1D, Embedding, Conv2d")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``(out, in)`` (a view; Conv2d is flattened to ``(out, in*kh*kw)``; a
    4-bit layer's weight is dequantized into a new float tensor, which writing to does not change)."""
    info = layer_info(module)
    if is_4bit(module):
        return dequantize(module)
    w = module.weight
    if info.kind == "conv1d":
        return w.T
    if info.kind == "embedding":
        return w.T  # (dim, vocab): the embedding is a linear map of a one-hot input
    if info.kind == "conv2d":
        return w.flatten(1)
    return w


def to_module_layout(module: nn.Module, delta_out_in: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_out_in` for a delta: reshape/transpose into ``module.weight``'s layout."""
    info = layer_info(module)
    if info.kind in ("conv1d", "embedding"):
        return delta_out_in.T
    if info.kind == "conv2d":
        return delta_out_in.reshape(module.weight.shape)
    return delta_out_in


def add_to_param(module: nn.Module, name: str, delta: torch.Tensor) -> float | None:
    """``P <- P + delta`` for the parameter ``name`` of ``module``, in place (merging, unmerging).

    A 4-bit layer's weight is dequantized, added to and requantized (quantization is lossy, so the
    result is deq(q(W + ΔW)), not W + ΔW): the requantization error max |deq(q(W + ΔW)) − (W + ΔW)|
    is returned. None for a float parameter (exact up to float rounding)."""
    if name == "weight" and is_4bit(module):
        w = dequantize(module)
        return requantize(module, w + delta.to(device=w.device, dtype=w.dtype))
    target = module.get_parameter(name)
    target.add_(delta.to(device=target.device, dtype=target.dtype))
    return None


def is_adaptable_layer(module: nn.Module) -> bool:
    """Whether ``layer_info`` understands ``module`` (Linear, Conv1D, Embedding, Conv2d, Linear4bit)."""
    try:
        layer_info(module)
        return True
    except TypeError:
        return False
