"""Hugging Face PEFT config fields shared by the structured reparameterizations (``loha``, ``lokr``,
``oft``, ``boft``): targeting and ``modules_to_save`` written from a placed adapter and read back,
and the refusal of PEFT fields that change the function and that peftlab does not implement.

PEFT's LOHA, LOKR, OFT and BOFT configs spell targeting as its LORA does (``target_modules``,
``exclude_modules``, ``layers_to_transform``, ``layers_pattern``, ``modules_to_save``); the
translation of each entry is ``core/peft_format.py``'s, the choice of entries VeRA's
(``vera.placed_targets``: the exact names adapted, when the placed adapter is known).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.peft_format import exclude_to_peft, modules_to_save_from_peft, modules_to_save_to_peft, targets_from_peft
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS
from peftlab.methods.reparam.vera import placed_targets


def peft_config_dict(
    peft_type: str, fields: Mapping[str, Any], cfg: AdapterConfig, placed: Mapping[str, nn.Module] | None, own: type
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``cfg``: ``peft_type``, the method's ``fields`` and the
    targeting fields. With ``placed`` (module name -> delta of the placed adapter; the method's
    deltas are instances of ``own``) the adapted names are written exactly, else the entries
    (``vera.placed_targets``; the default targets are LoRA's, as in PEFT). A selection PEFT cannot
    say without the placement (``module_types``) gives a peftlab-only file, which PEFT refuses."""
    try:
        target_modules, layers = placed_targets(cfg, placed, own, DEFAULT_TARGETS, exclude_field=True)
    except ConfigError:
        return {"peft_type": "PEFTLAB"}
    return {
        "peft_type": peft_type,
        **fields,
        "target_modules": target_modules,
        "exclude_modules": exclude_to_peft(cfg.exclude) if placed is None else None,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "modules_to_save": modules_to_save_to_peft(cfg.modules_to_save, placed),
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
    }


def targeting_from_peft(d: Mapping[str, Any]) -> dict[str, Any]:
    """Our targeting fields (``targets``, ``exclude``, ``layers``, ``modules_to_save``) from PEFT's."""
    layers = d.get("layers_to_transform")
    return {
        "targets": targets_from_peft(d.get("target_modules")),
        "exclude": targets_from_peft(d.get("exclude_modules")),
        "layers": [layers] if isinstance(layers, int) else layers,
        "modules_to_save": modules_to_save_from_peft(d),
    }


def refuse_unsupported(d: Mapping[str, Any], peft_type: str, allowed: Mapping[str, Any]) -> None:
    """Raise ConfigError when a field of ``allowed`` (name -> the values we implement; a tuple for
    several) holds anything else: such a file computes something peftlab does not."""
    for name, ok in allowed.items():
        value = d.get(name)
        values = ok if isinstance(ok, tuple) else (ok,)
        if value is not None and value not in values:
            raise ConfigError(f"PEFT {peft_type} field {name}={value!r} is not supported by peftlab (supported: "
                              f"{' or '.join(repr(v) for v in values)})")
