"""The same adapter, set up in peftlab and in Hugging Face PEFT.

A *variant* is one of the benchmarked adapter configurations (LoRA r=8, alpha=16 on q,v or on every
linear layer, with dropout 0 or 0.1; DoRA r=8 on q,v). :func:`wrap` attaches it with either library;
:func:`randomize_same` gives adapters of both libraries identical random weights (B nonzero), so
their outputs can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from peftlab.bench.models import ModelSpec

R, ALPHA = 8, 16
LIBS = ("peftlab", "peft")


@dataclass(frozen=True)
class Variant:
    """One adapter configuration of the benchmark."""

    key: str
    label: str
    method: str  # "lora" or "dora"
    targets: str  # "qv" or "all-linear"
    dropout: float


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("lora_qv", "LoRA q,v", "lora", "qv", 0.0),
        Variant("lora_qv_d0.1", "LoRA q,v drop .1", "lora", "qv", 0.1),
        Variant("lora_all", "LoRA all-linear", "lora", "all-linear", 0.0),
        Variant("lora_all_d0.1", "LoRA all-lin drop .1", "lora", "all-linear", 0.1),
        Variant("dora_qv", "DoRA q,v", "dora", "qv", 0.0),
    )
}


def method_string(variant: Variant, spec: ModelSpec) -> str:
    """peftlab's method string, e.g. ``lora[r=8,alpha=16,dropout=0.1,targets=q_proj|v_proj]``."""
    targets = "|".join(spec.qv) if variant.targets == "qv" else "all-linear"
    return f"{variant.method}[r={R},alpha={ALPHA},dropout={variant.dropout},targets={targets}]"


def peft_config(variant: Variant, spec: ModelSpec, with_head: bool):
    """PEFT's ``LoraConfig`` for the same adapter."""
    import peft

    return peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=variant.dropout,
        target_modules=list(spec.qv) if variant.targets == "qv" else "all-linear",
        use_dora=variant.method == "dora",
        modules_to_save=[spec.head] if with_head and spec.head else None,
    )


def wrap(lib: str, model: nn.Module, spec: ModelSpec, variant: Variant, adapter_name: str = "default",
         with_head: bool = True) -> nn.Module:
    """Attach ``variant`` to ``model`` with ``lib`` (``"peftlab"`` or ``"peft"``); the base is frozen,
    the adapter (and, for classifiers when ``with_head``, a copy of the head) is trainable."""
    if lib == "peftlab":
        import peftlab

        extra = {"modules_to_save": [spec.head]} if with_head and spec.head else {}
        return peftlab.apply(model, method_string(variant, spec), adapter_name=adapter_name, **extra)
    if lib == "peft":
        import peft

        return peft.get_peft_model(model, peft_config(variant, spec, with_head), adapter_name=adapter_name)
    raise ValueError(f"unknown library {lib!r}; expected one of {', '.join(LIBS)}")


def add_adapter(lib: str, wrapped: nn.Module, spec: ModelSpec, variant: Variant, name: str) -> None:
    """Add one more (inactive) adapter of ``variant`` named ``name``."""
    if lib == "peftlab":
        wrapped.add_adapter(name, method_string(variant, spec))
    else:
        wrapped.add_adapter(name, peft_config(variant, spec, with_head=False))


def lora_weights(lib: str, wrapped: nn.Module, name: str) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """``{module name in the base model: (A weight, B weight)}`` of adapter ``name``."""
    found: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    if lib == "peftlab":
        for _, module_name, delta in wrapped.placements[name]:
            if hasattr(delta, "lora_A"):
                found[module_name] = (delta.lora_A.weight, delta.lora_B.weight)
        return found
    from peft.tuners.lora import LoraLayer

    for module_name, module in wrapped.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            found[module_name] = (module.lora_A[name].weight, module.lora_B[name].weight)
    return found


def randomize_same(models: dict[str, nn.Module], names: list[str], seed: int, std: float = 0.02) -> None:
    """Give adapter ``names`` of every wrapped model in ``models`` (``{lib: wrapped}``; several
    models of one library may be passed as ``{"peftlab#2": ...}``) the same random A and B."""
    for i, name in enumerate(names):
        per_lib = {key: lora_weights(key.split("#")[0], m, name) for key, m in models.items()}
        modules = sorted(next(iter(per_lib.values())))
        for key, found in per_lib.items():
            if sorted(found) != modules:
                raise RuntimeError(f"adapter {name!r}: {key} adapts other modules than {next(iter(per_lib))}")
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        for module_name in modules:
            shape_a, shape_b = (t.shape for t in next(iter(per_lib.values()))[module_name])
            a = torch.randn(shape_a, generator=gen) / shape_a[1] ** 0.5
            b = torch.randn(shape_b, generator=gen) * std
            with torch.no_grad():
                for found in per_lib.values():
                    A, B = found[module_name]
                    A.copy_(a.to(A))
                    B.copy_(b.to(B))


def trainable(wrapped: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates."""
    return [p for p in wrapped.parameters() if p.requires_grad]


def train_step(net: nn.Module, params: list[nn.Parameter], lr: float, loss: Callable[[], torch.Tensor],
               after_step: Callable[[], None] | None = None) -> Callable[[], None]:
    """A training step of ``net`` as a closure (``net`` is put in training mode): zero the gradients
    (``set_to_none``), ``loss().backward()``, an AdamW step at ``lr`` on ``params``, then
    ``after_step()`` if given (a method's per-step action, which may read the gradients)."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    net.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()
        if after_step is not None:
            after_step()

    return step
