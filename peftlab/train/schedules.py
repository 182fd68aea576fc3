"""Learning-rate schedules: the multiplier of the peak lr at each optimizer step, and the
``LambdaLR`` that applies it (``peftlab train --lr-scheduler``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: ``--lr-scheduler`` names; the semantics follow transformers' schedules of the same names.
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def _warmup(step: int, warmup_steps: int) -> float:
    # The first step already gets 1/warmup_steps (never a step at lr 0).
    return (step + 1) / warmup_steps


def linear_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): rises linearly to 1 over
    ``warmup_steps`` steps (the first step already gets 1/warmup_steps), then falls linearly so
    the last step gets 1/(total_steps - warmup_steps)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def cosine_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """Warmup as :func:`linear_schedule`, then half a cosine from 1 towards 0:
    m(s) = ½ (1 + cos(π p)) with p = (s − w) / (T − w), so the last step gets a small positive lr."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """1 at every step: the peak lr throughout, no warmup (transformers' ``constant``)."""
    return 1.0


def constant_with_warmup_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """Warmup as :func:`linear_schedule`, then 1."""
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


_BY_NAME: dict[str, Callable[[int, int, int], float]] = {
    "linear": linear_schedule,
    "cosine": cosine_schedule,
    "constant": constant_schedule,
    "constant_with_warmup": constant_with_warmup_schedule,
}


def schedule_function(name: str) -> Callable[[int, int, int], float]:
    """The function of schedule ``name``; an unknown name is a ``ValueError`` listing the names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` giving every parameter group lr = its peak lr × the schedule's multiplier."""
    function = schedule_function(name)
    if warmup_steps < 0:
        raise ValueError(f"warmup steps must be >= 0, got {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: function(s, warmup_steps, total_steps))
