"""Files both ways with Hugging Face PEFT, for the per-method test files (DESIGN.md principle 5):
our saved directory loads in ``peft.PeftModel.from_pretrained``, PEFT's ``save_pretrained``
directory loads in ``peftlab.load``, and both give the same outputs."""

from __future__ import annotations

from typing import Any, Callable

import peft
import torch

import peftlab
from conftest import first_output, randomize_adapter

TOL = 1e-5


def outputs(model: Any, batch: dict) -> torch.Tensor:
    """The main output tensor of ``model(**batch)`` without autograd."""
    with torch.no_grad():
        return first_output(model(**batch))


def ours_in_peft(make: Callable, config: Any, batch: dict, path, std: float = 0.3) -> dict[str, torch.Tensor]:
    """peftlab adapter (randomized) -> ``pm.save`` -> PEFT loads it: {"ours", "theirs", "base"} outputs."""
    pm = peftlab.apply(make(), config)
    randomize_adapter(pm, std=std)
    ours = outputs(pm, batch)
    pm.save(path)
    theirs = outputs(peft.PeftModel.from_pretrained(make(), path), batch)
    return {"ours": ours, "theirs": theirs, "base": outputs(make(), batch)}


def peft_in_ours(make: Callable, peft_config: Any, batch: dict, path, std: float = 0.3) -> dict[str, torch.Tensor]:
    """PEFT adapter (trainable parameters moved by seeded noise) -> ``save_pretrained`` -> peftlab
    loads it: {"ours", "theirs", "base"} outputs."""
    model = peft.get_peft_model(make(), peft_config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)
    theirs = outputs(model, batch)
    model.save_pretrained(path)
    ours = outputs(peftlab.load(make(), path), batch)
    return {"ours": ours, "theirs": theirs, "base": outputs(make(), batch)}


def assert_same_and_adapted(out: dict[str, torch.Tensor], tol: float = TOL) -> float:
    """Ours and PEFT's outputs agree within ``tol`` and differ from the base model's; returns the max diff."""
    diff = (out["ours"] - out["theirs"]).abs().max().item()
    assert diff <= tol, diff
    assert (out["ours"] - out["base"]).abs().max().item() > 1e-3, "the adapter must change the outputs"
    return diff
