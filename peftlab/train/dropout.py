"""Turning a model's dropout off (``peftlab train --no-dropout``)."""

from __future__ import annotations

from torch import nn


def disable_dropout(model: nn.Module) -> int:
    """Set p = 0 on every ``nn.Dropout`` of ``model`` (transformers' attention reads its dropout
    module's p too); returns how many were changed.

    A joint run of several adapters draws its dropout masks over the joint batch, so an adapter
    sees other masks than when it trains alone; with dropout off, the two runs compute the same."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p:
            module.p = 0.0
            changed += 1
    return changed
