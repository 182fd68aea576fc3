"""Deterministic construction of randomly initialised weights without disturbing the caller's RNG."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's global RNG seeded to ``seed``; restore the previous state on exit.

    Newly initialised parameters (a classification head, a whole tiny model) therefore come out
    identical on every call, and code that relies on the global RNG elsewhere is unaffected.
    CUDA generators are forked and seeded too, but only when CUDA is already initialised, so a
    CPU-only call never triggers CUDA initialisation.
    """
    cuda_devices: list[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=cuda_devices):
        torch.random.default_generator.manual_seed(seed)
        if cuda_devices:
            torch.cuda.manual_seed_all(seed)
        yield
