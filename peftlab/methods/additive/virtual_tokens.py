"""What the virtual-token methods share (prefix tuning and P-tuning v2, prompt tuning, P-tuning):
``length`` virtual tokens and Hugging Face PEFT's prompt-learning geometry fields, filled from the
model in place when the config is applied, as PEFT's ``_prepare_prompt_learning_config`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.io import task_type_of
from peftlab.core.peft_format import modules_to_save_from_peft, modules_to_save_to_peft



@dataclass(kw_only=True)
class VirtualTokensConfig(AdapterConfig):
    """``length`` virtual tokens, and PEFT's geometry fields.

    num_layers, token_dim, num_attention_heads, num_transformer_submodules, task_type: PEFT's geometry
        fields. ``None`` means "infer from the model"; the builder fills them in place, as PEFT does,
        so the config can be written in PEFT's format. A value that does not fit the model is refused.
    Targeting fields do not apply (``targets``, ``exclude``, ``layers`` and ``module_types`` must be
    None; ``modules_to_save`` works).
    """

    identity_at_init = False
    peft_module_prefix = "base_model."  # PEFT's prompt-learning wrapper holds the model directly
    #: Completes "None: <method> ..." in the error for a targeting field.
    placement: ClassVar[str] = "adds virtual tokens, not modules to adapt"
    length: int = 20
    num_layers: int | None = None
    token_dim: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None
    task_type: str | None = None

    def validate(self) -> None:
        for name in ("targets", "exclude", "layers", "module_types"):
            self._check(getattr(self, name) is None, name, f"None: {self.method} {self.placement}")
        for name in ("length", "num_layers", "token_dim", "num_attention_heads"):
            v = getattr(self, name)
            self._check((v is None and name != "length") or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                        name, "a positive int" + ("" if name == "length" else " or None"))
        self._check(self.num_transformer_submodules in (None, 1, 2) and not isinstance(
            self.num_transformer_submodules, bool), "num_transformer_submodules", "None, 1 or 2")

    def fill_geometry(self, model: nn.Module, found: dict[str, Any]) -> None:
        """Set each geometry field that is None to the model's value ``found[field]``; a field set to
        another value is refused (``task_type`` may differ)."""
        for key, value in found.items():
            given = getattr(self, key)
            if given is None:
                setattr(self, key, value)
            elif given != value and key != "task_type":
                raise ConfigError(f"{self.method}: {key}={given} does not fit {type(model).__name__} ({key}={value}); "
                                  "a config is filled in place when applied, use a fresh one for another model")

    def peft_fields(self, placed: Any = None) -> dict[str, Any]:
        """PEFT's ``PromptLearningConfig`` fields (geometry, ``modules_to_save``, inference mode);
        ``placed``: {module name: delta} of the placed adapter, for ``modules_to_save``."""
        if None in (self.num_layers, self.token_dim, self.num_attention_heads, self.num_transformer_submodules):
            raise ConfigError(f"{self.method}: the geometry (num_layers, token_dim...) is known once the config is applied")
        return {
            "task_type": self.task_type,
            "num_virtual_tokens": self.length,
            "num_layers": self.num_layers,
            "token_dim": self.token_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_transformer_submodules": self.num_transformer_submodules,
            "modules_to_save": modules_to_save_to_peft(self.modules_to_save, placed),
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
        }


def geometry_from_peft(d: dict[str, Any]) -> dict[str, Any]:
    """Our :class:`VirtualTokensConfig` fields from PEFT's ``PromptLearningConfig`` fields ``d``."""
    return {"length": int(d["num_virtual_tokens"]), "token_dim": d.get("token_dim"), "num_layers": d.get("num_layers"),
            "num_attention_heads": d.get("num_attention_heads"),
            "num_transformer_submodules": d.get("num_transformer_submodules"), "task_type": d.get("task_type"),
            "modules_to_save": modules_to_save_from_peft(d)}


def peft_task_type(model: nn.Module) -> str:
    """PEFT's ``task_type`` for a prompt-learning adapter on ``model``: SEQ_2_SEQ_LM for an
    encoder-decoder, else the class's (:func:`~peftlab.core.io.task_type_of`); PEFT's prompt-learning
    wrapper needs one, and a model it does not name is a feature extractor."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return task_type_of(model) or "FEATURE_EXTRACTION"
