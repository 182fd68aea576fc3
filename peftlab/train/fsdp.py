"""FSDP for bases too big for one device: PyTorch's own ``fully_shard`` (FSDP2), with every adapter
sharded in the unit of the block it sits in.

FSDP shards parameters by unit: a unit's parameters are gathered just before its forward and freed
after it. The usual policy makes one unit per transformer block. peftlab's deltas do not live inside
the blocks (``pm.adapter_modules`` holds them, beside the base, and hooks call them), so wrapping the
blocks alone would leave every delta in the root unit, gathered for the whole forward. FSDP2's
grouped form ``fully_shard([block, delta, delta, ...])`` makes one unit of a block and the deltas
placed inside it, without moving anything: the base keeps its structure and its ``state_dict`` keys.

- Blocks are the entries of every outermost ``nn.ModuleList`` of one class that holds parameters
  (:func:`~peftlab.methods.selective.freeze_layers.block_stacks`: ``encoder.layer.N``,
  ``model.layers.N``...).
- A delta goes with the block that contains its module. Deltas at the model level (prefixes,
  prompts), outside every block (a copied classifier head), or sharing a parameter with a delta of
  another block (Compacter's rule) go to the root unit: ``fully_shard(pm)``, which also takes the
  base's remaining parameters (embeddings, final norm, head).

Between steps the trainable parameters are sharded ``DTensor`` s; :func:`full_adapters` gathers
them (every process takes part) so that process 0 can save the adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from peftlab.core.model import PeftModel
from peftlab.methods.selective.freeze_layers import block_stacks


class FsdpError(ValueError):
    """A model or adapter that this FSDP wrapping cannot shard; the message says why and what to use."""


def block_units(pm: PeftModel) -> dict[str, list[nn.Module]]:
    """{block name: [the block, the deltas placed inside it...]} for every block of ``pm.model``
    (module docstring). Deltas that go to the root unit are in no list."""
    blocks = [name for names in block_stacks(pm.model).values() for name in names]
    if not blocks:
        raise FsdpError(f"FSDP: {type(pm.model).__name__} has no blocks (an nn.ModuleList of layers of one class) "
                        "to shard by; train it with DDP (torchrun without --fsdp)")
    units: dict[str, list[nn.Module]] = {b: [pm.model.get_submodule(b)] for b in blocks}
    owner: dict[int, set[str]] = {}  # parameter id -> the blocks whose deltas hold it
    placed: list[tuple[str, nn.Module]] = []
    for adapter in pm.adapters:
        for _, module_name, delta in pm.placements[adapter]:
            block = next((b for b in blocks if module_name == b or module_name.startswith(b + ".")), None)
            if delta.site == "model" or block is None:
                continue
            placed.append((block, delta))
            for p in delta.parameters():
                owner.setdefault(id(p), set()).add(block)
    for block, delta in placed:
        if all(len(owner[id(p)]) == 1 for p in delta.parameters()):
            units[block].append(delta)
    return units


def shard_with_blocks(pm: PeftModel, mesh: Any) -> PeftModel:
    """Apply ``fully_shard`` to each block with its deltas (:func:`block_units`), then to ``pm`` (the
    root unit). ``pm`` is sharded in place (its class becomes FSDP's subclass) and returned. Build
    the optimizer afterwards: the trainable parameters are new ``DTensor`` objects."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # noqa: PLC0415

    acting = [name for name in pm.adapters if name in pm._training]
    if acting:
        raise FsdpError(f"FSDP: adapter(s) {acting} use a method that acts during training (core/training.py: "
                        "AdaLoRA, DyLoRA); its hooks may read or change parameters and gradients between steps, where "
                        "FSDP keeps them sharded, which is not supported: train them with DDP (torchrun without --fsdp)")
    for modules in block_units(pm).values():
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh)
    fully_shard(pm, mesh=mesh)
    # generate() calls the base's forward, not pm's: without this the root unit (embeddings, head)
    # would stay sharded during generation.
    register_fsdp_forward_method(pm, "generate")
    return pm


def fsdp_units(model: nn.Module) -> list[list[str]]:
    """The names of the parameters each FSDP unit of ``model`` manages, one list per unit (reads FSDP2's
    state: there is no public call for it)."""
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    names = {id(p): n for n, p in model.named_parameters()}
    units, seen = [], set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        if id(state) in seen:  # a grouped unit: one state for all its modules
            continue
        seen.add(id(state))
        units.append([names[id(fp.sharded_param)] for group in state._fsdp_param_groups for fp in group.fsdp_params])
    return units


@contextlib.contextmanager
def full_adapters(pm: PeftModel) -> Iterator[None]:
    """Inside the block, every adapter parameter is a whole plain tensor (gathered from its shards: a
    collective, so every process must enter), as ``pm.save`` and ``pm.report`` read them; the shards
    are put back on exit. Only the adapters are gathered, never the base."""
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    for module in pm.modules():
        # Sharded state first: the root unit stays gathered after a forward, and a state_dict() call
        # (a copied head saves through it) would put the shards back over the whole tensors.
        if isinstance(module, FSDPModule):
            module.reshard()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in pm.adapter_modules.modules():
            for name, p in list(module._parameters.items()):
                if isinstance(p, DTensor):
                    full = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                    module._parameters[name] = full
                    swapped.append((module, name, p))
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
