"""LoRA configs in Hugging Face PEFT's ``adapter_config.json`` (``peft_type="LORA"``), both ways.

PEFT writes DoRA as LORA with ``use_dora=true``: the one reader turns such files into ``DoraConfig``.
Targeting that PEFT's fields cannot say (a regex restricted to ``layers``) is folded into one regex;
modules named in ``modules_to_save`` are never targeted, as in PEFT. PEFT fields that change what the
adapter computes and that peftlab does not implement are refused on reading, never ignored. The
translation of targets, layers and ``modules_to_save`` is shared with other methods
(``peftlab/core/peft_format.py``).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.layers import layer_info
from peftlab.core.peft_format import (
    exclude_to_peft,
    modules_to_save_from_peft,
    modules_to_save_to_peft,
    targets_from_peft,
    targets_to_peft,
)
from peftlab.core.targeting import entry_matches
from peftlab.methods.reparam.lora.config import DEFAULT_TARGETS, DoraConfig, LoraConfig
from peftlab.methods.reparam.lora.deltas import LoraConv2d, LoraEmbedding, LoraLinear


def config_to_peft(cfg: LoraConfig, placed: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
    """Hugging Face PEFT's ``LoraConfig`` fields for ``cfg``.

    ``placed`` (module name -> delta of a placed adapter, when the caller has one) adds what only
    the model knows: ``fan_in_fan_out`` for GPT-2's ``Conv1D``, and the adapted modules' names
    where the targeting needs the model (``"all-linear"``, written as PEFT writes it: the resolved
    names; ``module_types``; the default targets, written as the entries that matched).
    Without it, ``"all-linear"`` with ``layers`` is written as is, which PEFT refuses loudly.
    """
    targets = cfg.targets if cfg.targets is not None else DEFAULT_TARGETS
    exclude, layers = cfg.exclude or None, cfg.layers
    lora = [n for n, d in (placed or {}).items() if isinstance(d, (LoraLinear, LoraEmbedding, LoraConv2d))]
    if placed is not None and ("all-linear" in targets or cfg.module_types is not None):
        target_modules: list[str] | str | None = sorted(lora)  # exact: selection already applied
        exclude = layers = None
    elif placed is not None and cfg.targets is None:
        target_modules = [e for e in DEFAULT_TARGETS if any(entry_matches(e, n) for n in lora)]
    else:
        target_modules = targets_to_peft(targets, layers)
    if isinstance(target_modules, str) and target_modules != "all-linear":
        layers = None  # folded into the regex: PEFT refuses layers_to_transform with a regex
    fan_in_fan_out = any(
        isinstance(d, LoraLinear) and layer_info(d.base_layer).kind == "conv1d" for d in (placed or {}).values()
    )
    return {
        "peft_type": "LORA",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "exclude_modules": exclude_to_peft(exclude),
        "layers_to_transform": layers,
        "layers_pattern": None,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.method == "dora",
        "init_lora_weights": {"kaiming": True}.get(cfg.init, cfg.init),
        # PEFT's LoftQConfig: 4-bit (NF4) is the only kind peftlab quantizes to.
        "loftq_config": {"loftq_bits": 4, "loftq_iter": cfg.loftq_iter} if cfg.init == "loftq" else {},
        "modules_to_save": modules_to_save_to_peft(cfg.modules_to_save, placed),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
    }


#: PEFT fields that change what the adapter computes and that peftlab does not implement.
_PEFT_UNSUPPORTED = (
    "rank_pattern", "alpha_pattern", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "velora_config",
    "monteclora_config",
)
#: PEFT inits that leave the base weights alone: a loaded adapter's outputs do not depend on them.
_PEFT_PLAIN_INITS = {"eva": "kaiming", "orthogonal": "kaiming", "mica": "kaiming", "gaussian": "gaussian"}


def _init_from_peft(init: Any) -> str:
    if init in (True, False, None):
        return "kaiming"
    if isinstance(init, str) and init.lower() in ("pissa", "olora", "loftq"):
        return init.lower()
    if isinstance(init, str) and init.lower() in _PEFT_PLAIN_INITS:
        return _PEFT_PLAIN_INITS[init.lower()]
    raise ConfigError(
        f"PEFT init_lora_weights={init!r} is not supported: PEFT rewrites the base weights with a residual that "
        "peftlab cannot recompute from the base alone (supported: true, false, gaussian, pissa, olora, loftq, eva, "
        "orthogonal)"
    )


def config_from_peft(d: dict[str, Any]) -> LoraConfig:
    """Our config from PEFT's LORA fields (``DoraConfig`` when ``use_dora``)."""
    for unsupported in _PEFT_UNSUPPORTED:
        if d.get(unsupported):
            raise ConfigError(f"PEFT field {unsupported} is not supported yet (got {d[unsupported]})")
    if d.get("bias", "none") not in ("none", None):
        raise ConfigError(f"PEFT field bias={d['bias']!r} is not supported yet (only 'none')")
    init = _init_from_peft(d.get("init_lora_weights", True))
    loftq = (d.get("loftq_config") or {}) if init == "loftq" else {}
    if loftq.get("loftq_bits", 4) != 4:
        raise ConfigError(f"PEFT loftq_config.loftq_bits={loftq['loftq_bits']} is not supported (peftlab's LoftQ is 4-bit NF4)")
    cls = DoraConfig if d.get("use_dora") else LoraConfig
    return cls(
        r=int(d["r"]),
        alpha=d.get("lora_alpha", 8),
        dropout=float(d.get("lora_dropout", 0.0)),
        rslora=bool(d.get("use_rslora", False)),
        init=init,
        loftq_iter=int(loftq.get("loftq_iter", 1)),
        targets=targets_from_peft(d.get("target_modules")),
        exclude=targets_from_peft(d.get("exclude_modules")),
        layers=d.get("layers_to_transform"),
        modules_to_save=modules_to_save_from_peft(d),
    )
