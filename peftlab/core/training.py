"""Methods that act during training (DESIGN.md principle 7): one protocol for all of them.

Some methods change while they train: a loss term (AdaLoRA's orthogonality penalty, SoRA's L1,
DiffPruning's L0), an action after each optimizer step (AdaLoRA's rank budget, DyLoRA's rank
sampling, Delta-LoRA's update of W), or data before training (Fisher information, LoftQ,
data-driven inits). Such a method declares a :class:`TrainingHooks` subclass at registration
(``register_method(..., training=MyHooks)``); the container builds one instance per adapter (per
part of a union) from the config and the deltas it placed, and exposes them as

    loss = task_loss + pm.regularizer()     # Σ over the adapters being trained
    loss.backward(); optimizer.step()
    pm.on_step()                            # before zero_grad: hooks may read the gradients
    optimizer.zero_grad()

with ``pm.begin_training(total_steps)`` once before the first step (schedules that need the run's
length read it) and ``pm.calibrate(batches)`` once before training when ``pm.needs_calibration``. ``peftlab train``
(``peftlab.train.trainer.Trainer``) does exactly this; a user's own loop does the same. No method
gets special code in a trainer.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import torch
from torch import nn


class TrainingHooks:
    """What one adapter of a method does while it trains. Subclasses override what they need.

    ``config`` is the adapter's (part) config; ``deltas`` maps module name ("" for the model level)
    to the delta placed there, in model order."""

    #: Whether :meth:`calibrate` must see data before training starts.
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: Any, deltas: dict[str, nn.Module]):
        self.config = config
        self.deltas = deltas

    def begin(self, total_steps: int | None) -> None:
        """Called once before the first step with the run's planned number of optimizer steps
        (None: unknown), for schedules that need it (AdaLoRA's rank budget)."""

    def regularizer(self) -> torch.Tensor | None:
        """A term added to the training loss (None: nothing this step)."""
        return None

    def on_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based), before the gradients are cleared."""

    def calibrate(self, model: nn.Module, batches: list[dict[str, Any]]) -> None:
        """Called once before training with a few batches of the training data; ``model`` is the
        container, callable on the batches with this adapter active."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume exactly (counters, running statistics)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def total_regularizer(hooks: Iterable[TrainingHooks], like: torch.Tensor) -> torch.Tensor:
    """Σ of the hooks' loss terms as a 0-dim tensor on ``like``'s device (0 when none adds one)."""
    # torch.zeros, not like.new_zeros: a sharded (FSDP) parameter would make the sum a DTensor.
    total = torch.zeros((), device=like.device, dtype=like.dtype)
    for h in hooks:
        term = h.regularizer()
        if term is not None:
            total = total + term.to(total.dtype)
    return total
