"""Selection as deltas over existing base tensors, shared by the selective methods (BitFit, LayerNorm
tuning, layer freezing).

A selective method trains some of the base model's own tensors P. Without touching the base
(DESIGN.md principle 1) each selected tensor gets a trainable copy P' (``tuned_<name>``, float32)
beside a frozen snapshot P0 of the base tensor taken when the delta is created, and acts through
their difference, so several adapters can coexist and unloading is exact:

    ΔP = P' − P0  (0 at init)    merging adds ΔP to the base tensor (``delta_params``)

The optimizer updates P' itself, as full fine-tuning updates P (weight decay pulls P' toward 0, not
ΔP). Files hold the tuned values P' under the base tensor's own name (``<module>.<name>``, after a
method's ``file_prefix``), so stripping the prefixes gives a partial state dict of the base model;
saving while merged is still correct, and loading copies P' bit for bit.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from peftlab.core.delta import Delta, per_row


class TunedDelta(Delta):
    """Deltas ``delta_<name>`` over the base module's tensors ``<name>`` (see the module docstring);
    a subclass calls :meth:`_tune` and defines ``forward`` (what P0 + ΔP changes in the output)."""

    site = "parallel"
    #: Inserted between the module name and the tensor name in file keys (PEFT's LN tuning:
    #: ``ln_tuning_layers.``).
    file_prefix: ClassVar[str] = ""

    def _tune(self, base: nn.Module, names: Sequence[str]) -> None:
        """Create the trainable copy P' (float32) and the snapshot P0 of each of the base's tensors ``names``."""
        self.tuned = tuple(names)
        self.merges_into = self.tuned  # type: ignore[misc]
        for n in self.tuned:
            p = getattr(base, n).detach()
            self.register_parameter(f"tuned_{n}", nn.Parameter(p.to(torch.float32, copy=True)))
            self.register_buffer(f"{n}0", p.to(torch.float32, copy=True), persistent=False)

    def delta_of(self, name: str) -> torch.Tensor:
        """ΔP = P' − P0 of the base tensor ``name``."""
        return getattr(self, f"tuned_{name}") - getattr(self, f"{name}0")

    def delta_params(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """Merging adds ΔP = P' − P0 to each tuned tensor."""
        return {n: self.delta_of(n).detach() for n in self.tuned}

    def file_state(self) -> dict[str, torch.Tensor]:
        """The tuned values P' under ``<file_prefix><name>``."""
        return {self.file_prefix + n: getattr(self, f"tuned_{n}").detach() for n in self.tuned}

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in self.tuned:
                p = getattr(self, f"tuned_{n}")
                p.copy_(state[self.file_prefix + n].to(p.dtype))


def gathered(deltas: Sequence[Delta | None], name: str, slot: torch.Tensor) -> torch.Tensor:
    """Mixed batch: row i gets ΔP ``name`` of its slot's delta, zeros where the slot is −1, the
    slot has no delta, or its delta does not tune ``name``; one gather, shape (batch, *ΔP.shape)."""
    own = [d.delta_of(name) if isinstance(d, TunedDelta) and name in d.tuned else None for d in deltas]
    ref = next(t for t in own if t is not None)
    return per_row(own, slot, torch.zeros_like(ref))
