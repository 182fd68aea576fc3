"""Honest accounting of an adapter (DESIGN.md principle 4, seed 001 §12-13).

trainable_params  entries the optimizer updates (parameters of the adapter with requires_grad at
                  creation; LoRA-FA's frozen A does not count)
changed_params    entries of the base model that differ after merging (for a delta that cannot be
                  merged: the parameters it adds to the computation)
total_params      base parameters + every adapter parameter
ranks             {module: rank of ΔW} where a weight delta exists
bytes_on_disk     exact size of the saved adapter (config + safetensors)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftlab.core import io

if TYPE_CHECKING:
    from peftlab.core.model import PeftModel


def adapter_report(pm: "PeftModel", name: str) -> dict[str, Any]:
    """Trainable, changed and total parameters, ranks per module and bytes on disk of one adapter (seed 001 §12)."""
    placement = pm.placements[name]
    store = pm.adapter_modules[name]
    trainable = sum(p.numel() for p, flag in pm.adapter_parameters(name) if flag)
    adapter_params = sum(p.numel() for p in store.parameters())
    base_params = sum(p.numel() for p in pm.model.parameters())
    changed = 0
    ranks: dict[str, int] = {}
    for _, module_name, delta in placement:
        base = pm.model.get_submodule(module_name) if module_name else pm.model
        changed += delta.changed_params(base)
        r = delta.rank()
        if r is not None:
            ranks[module_name] = r
    cfg = pm.configs[name]
    tensors = io.placement_tensors(placement, cfg)
    return {
        "adapter": name,
        "method": cfg.to_string(),
        "trainable_params": trainable,
        "changed_params": changed,
        "adapter_params": adapter_params,
        "base_params": base_params,
        "total_params": base_params + adapter_params,
        "trainable_percent": 100.0 * trainable / max(1, base_params + adapter_params),
        "ranks": ranks,
        "bytes_on_disk": io.serialized_size(cfg, tensors, pm.placed(name)),
        "modules": len({m for _, m, _ in placement}),
    }
