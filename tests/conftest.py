"""Shared helpers for the test suite: tiny models, output extraction, adapter randomisation."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def first_output(out) -> torch.Tensor:
    """The main tensor of a model output (logits, or the last hidden state)."""
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key) and getattr(out, key) is not None:
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else out


def randomize_adapter(pm, adapter: str = "default", std: float = 0.1, seed: int = 0) -> None:
    """Move every trainable adapter parameter away from its init (so B ≠ 0, vectors ≠ 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_modules[adapter].parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


@pytest.fixture
def tiny():
    from peftlab.zoo import tiny_batch, tiny_model

    def make(kind: str, task: str = "base", seed: int = 0):
        model = tiny_model(kind, task=task, seed=seed)
        return model, tiny_batch(model, batch=3, seq=8)

    return make
