"""Optimizer parameter groups for adapters, including LoRA+ (Hayou et al. 2024; seed 002 §3.3).

LoRA+: the learning rate of B is λ times that of A (λ = ``loraplus_ratio``, ≈16), because with B = 0 at
init the two factors need different step sizes for efficient feature learning.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_B_NAMES = ("lora_B", "lora_embedding_B")


def param_groups(
    pm: nn.Module, lr: float = 2e-4, loraplus_ratio: float = 1.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: ``lr`` for most, ``lr * loraplus_ratio`` for LoRA's B.

    Biases and 1-d parameters (norms, DoRA magnitudes, (IA)³ vectors) get no weight decay."""
    groups: dict[str, dict[str, Any]] = {}

    def add(key: str, p: nn.Parameter, group_lr: float, wd: float) -> None:
        groups.setdefault(key, {"params": [], "lr": group_lr, "weight_decay": wd, "name": key})["params"].append(p)

    for name, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        decay = weight_decay if p.ndim >= 2 else 0.0
        if any(f"{b}." in name or name.endswith(b) for b in _B_NAMES):
            add("lora_B", p, lr * loraplus_ratio, decay)
        else:
            add("decay" if decay else "no_decay", p, lr, decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: apply an adapter (or set_adapter) first")
    return list(groups.values())
