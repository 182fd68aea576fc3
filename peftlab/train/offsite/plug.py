"""``peftlab offsite plug``: the model owner's side after training. The adapter trained on the emulator
is merged there, and every tensor it changed is written into the full model: a tensor of emulator
adapter block j goes to full-model block ``plan.source_of(j)``, a tensor outside the stack (a task
head) to the same name. Nothing else of the full model is touched.

The adapter may be any method that merges into the weights (``freeze_layers`` on the adapter blocks,
LoRA restricted to them with ``layers=...``, BitFit...). An adapter that changed a compressed middle
block of the emulator is refused: that block does not exist as such in the full model.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

import peftlab
from peftlab.train.offsite.plan import EmulatorPlan
from peftlab.train.offsite.stack import block_stack


class PlugError(ValueError):
    """An adapter that cannot be plugged into the full model; the message says why and what would work."""


def changed_tensors(emulator: nn.Module, adapter_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """{state-dict key: merged value} of every emulator tensor the adapter in ``adapter_dir`` changes
    (``emulator`` itself ends merged)."""
    before = {k: v.detach().clone() for k, v in emulator.state_dict().items()}
    pm = peftlab.load(emulator, adapter_dir)
    method = getattr(pm.configs["default"], "method", type(pm.configs["default"]).__name__)
    try:
        merged = pm.merge_and_unload()
    except (ValueError, TypeError, NotImplementedError) as err:
        raise PlugError(f"the adapter in {adapter_dir} ({method}) cannot be merged into the weights, so it cannot "
                        "be plugged as blocks; train the emulator's adapter blocks with freeze_layers[blocks=...] "
                        f"or a merging method such as lora[layers=...] ({err})") from err
    after = merged.state_dict()
    return {k: v.detach() for k, v in after.items() if not torch.equal(before[k], v)}


def full_model_key(key: str, stack: str, plan: EmulatorPlan) -> str:
    """The full model's name for emulator state-dict ``key``: block indices of the stack mapped by the plan.

    Raises :class:`PlugError` for a tensor of a compressed middle block."""
    match = re.fullmatch(rf"{re.escape(stack)}\.(\d+)\.(.+)", key)
    if match is None:
        return key
    j = int(match.group(1))
    if j not in plan.adapter_blocks:
        raise PlugError(f"the adapter changed {key}, in emulator block {j}: a compressed middle block (the adapter "
                        f"blocks are {plan.adapter_blocks}); restrict the method to them, e.g. layers="
                        f"{'|'.join(map(str, plan.adapter_blocks))} or freeze_layers[blocks=...]")
    return f"{stack}.{plan.source_of(j)}.{match.group(2)}"


def plug_into(full: nn.Module, emulator: nn.Module, adapter_dir: str | os.PathLike[str],
              plan: EmulatorPlan) -> dict[str, str]:
    """Write the adapter's changes (trained on ``emulator``) into ``full``, in place; returns
    {emulator key: full-model key} of every tensor written. Every check runs before ``full`` is touched."""
    stack, blocks = block_stack(full)
    if len(blocks) != plan.num_layers:
        raise PlugError(f"the emulator was cut from a {plan.num_layers}-block model; this model has {len(blocks)}")
    if block_stack(emulator)[0] != stack:
        raise PlugError(f"the emulator's blocks are {block_stack(emulator)[0]} but the full model's are {stack}: "
                        "load both for the same task")
    changed = changed_tensors(emulator, adapter_dir)
    targets = full.state_dict()
    mapping = {k: full_model_key(k, stack, plan) for k in changed}
    for k, target_key in mapping.items():
        if target_key not in targets or targets[target_key].shape != changed[k].shape:
            raise PlugError(f"the adapter changed {k}, which has no counterpart {target_key} of shape "
                            f"{tuple(changed[k].shape)} in the full model: load both for the same task")
    with torch.no_grad():
        for k, target_key in mapping.items():
            targets[target_key].copy_(changed[k])
    return mapping
