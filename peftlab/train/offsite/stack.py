"""The block stack of a transformer, and an emulator cut from it by an :class:`EmulatorPlan`."""

from __future__ import annotations

import copy

from torch import nn

from peftlab.methods.selective.freeze_layers import block_stacks
from peftlab.train.offsite.plan import EmulatorPlan, PlanError

#: Config fields that count the blocks (BERT and Llama: num_hidden_layers; GPT-2: n_layer).
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the model's one stack of blocks (``bert.encoder.layer``, ``model.layers``).

    Raises :class:`PlanError` for a model with no stack or several (an encoder-decoder such as T5)."""
    stacks = block_stacks(model)
    if len(stacks) != 1:
        found = ", ".join(stacks) or "none"
        raise PlanError(f"Offsite-Tuning needs a model with one stack of blocks (an encoder or a decoder); "
                        f"{type(model).__name__} has {len(stacks)} ({found})")
    name = next(iter(stacks))
    return name, model.get_submodule(name)


def _renumber(block: nn.Module, index: int) -> None:
    """Set every ``layer_idx`` inside ``block`` to ``index`` (transformers indexes its key/value cache by it)."""
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def _shrink_config(config: object, plan: EmulatorPlan) -> None:
    for field in LAYER_COUNT_FIELDS:
        if isinstance(getattr(config, field, None), int):
            setattr(config, field, plan.emulator_layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == plan.num_layers:
        config.layer_types = [layer_types[i] for i in plan.kept]


def cut_emulator(model: nn.Module, plan: EmulatorPlan) -> nn.Module:
    """A copy of ``model`` whose block stack holds the plan's blocks (copies, in order); the model's
    config counts them. Everything outside the stack (embeddings, final norm, heads) is copied as is."""
    name, stack = block_stack(model)
    if len(stack) != plan.num_layers:
        raise PlanError(f"the plan is for {plan.num_layers} blocks but {name} has {len(stack)}")
    kept = nn.ModuleList()
    for j, i in enumerate(plan.kept):
        block = copy.deepcopy(stack[i])
        _renumber(block, j)
        kept.append(block)
    # Copy the model without its stack (memo maps the stack to the new one), so the full set of blocks
    # is never duplicated in memory.
    emulator = copy.deepcopy(model, memo={id(stack): kept})
    _shrink_config(emulator.config, plan)
    return emulator
