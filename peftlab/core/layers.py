"""What a delta needs to know about the layer it sits on: shapes and weight layout.

Deltas work in one layout, ``(out_features, in_features)`` as ``nn.Linear`` stores it. GPT-2's
``Conv1D`` stores the transpose; this module converts so no method needs a special case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerInfo:
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
    """The module's weight as ``(out, in)`` (a view; Conv2d is flattened to ``(out, in*kh*kw)``)."""
    info = layer_info(module)
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


def is_adaptable_layer(module: nn.Module) -> bool:
    try:
        layer_info(module)
        return True
    except TypeError:
        return False
