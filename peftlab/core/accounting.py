"""Honest accounting of an adapter (DESIGN.md principle 4, seed 001 §12-13).

trainable_params  entries the optimizer updates (parameters of the adapter with requires_grad at
                  creation; LoRA-FA's frozen A does not count)
changed_params    entries of the base model that differ after merging (for a delta that cannot be
                  merged: the parameters it adds to the computation)
total_params      base parameters + every adapter parameter
ranks             {module: rank of ΔW} where a weight delta exists
bytes_on_disk     exact size of the saved adapter (its files: ``io.ADAPTER_FILES``)

It works on plain data (the base model, the config and the placement), so it depends on neither the
container nor the methods.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from peftlab.core import io
from peftlab.core.config import AdapterConfig, UnionConfig
from peftlab.core.quantized import logical_numel


def adapter_report(
    model: nn.Module,
    cfg: AdapterConfig | UnionConfig,
    placement: Sequence[tuple[int, str, nn.Module]],
    trainable: Sequence[nn.Parameter],
    adapter_params: Sequence[nn.Parameter],
    placed: dict[str, nn.Module] | None = None,
    adapter_name: str = "default",
) -> dict[str, Any]:
    """Trainable, changed and total parameters, ranks per module and bytes on disk of one adapter.

    trainable = Σ numel over ``trainable``; changed = Σ over placed deltas of
    ``delta.changed_params(base module)``; total = base + every adapter parameter (seed 001 §12)."""
    n_trainable = sum(p.numel() for p in trainable)
    n_adapter = sum(p.numel() for p in adapter_params)
    base_params = sum(logical_numel(p) for p in model.parameters())  # a 4-bit weight: its entries
    changed = 0
    ranks: dict[str, int] = {}
    for _, module_name, delta in placement:
        base = model.get_submodule(module_name) if module_name else model
        changed += delta.changed_params(base)
        r = delta.rank()
        if r is not None:
            ranks[module_name] = r
    tensors = io.placement_tensors(list(placement), cfg)
    return {
        "adapter": adapter_name,
        "method": cfg.to_string(),
        "trainable_params": n_trainable,
        "changed_params": changed,
        "adapter_params": n_adapter,
        "base_params": base_params,
        "total_params": base_params + n_adapter,
        "trainable_percent": 100.0 * n_trainable / max(1, base_params + n_adapter),
        "ranks": ranks,
        "bytes_on_disk": io.serialized_size(cfg, tensors, placed, base=model),
        "modules": len({m for _, m, _ in placement}),
    }
