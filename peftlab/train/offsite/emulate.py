"""``peftlab offsite emulate``: the model owner's side. Cut a lossy emulator from a model, optionally
distil it, and write it as an ordinary Hugging Face model directory plus ``offsite_emulator.json``.

The directory loads like any model (``peftlab train --model EMU_DIR ...``); its manifest records the
plan (which full-model block each emulator block is), the adapter blocks the data owner trains and a
method string that trains exactly them (``freeze_layers[blocks=...]``), and the distillation run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.train.offsite.distill import distill
from peftlab.train.offsite.plan import EmulatorPlan
from peftlab.train.offsite.stack import block_stack, cut_emulator

MANIFEST = "offsite_emulator.json"


def adapter_method(model: nn.Module, plan: EmulatorPlan) -> str:
    """A method string that trains exactly the emulator's adapter blocks (full fine-tuning of them)."""
    leaf = block_stack(model)[0].split(".")[-1]
    return "freeze_layers[blocks=" + "|".join(f"{leaf}.{j}" for j in plan.adapter_blocks) + "]"


def build_emulator(model: nn.Module, plan: EmulatorPlan, tokenizer: Any = None, texts: list[str] | None = None,
                   distill_steps: int = 0, **distill_options: Any) -> tuple[nn.Module, dict[str, Any] | None]:
    """The emulator of ``model`` under ``plan`` and the distillation report (None without distillation).

    With ``distill_steps > 0`` the middle blocks are distilled on ``texts`` (see
    :func:`~peftlab.train.offsite.distill.distill`, which takes ``distill_options``)."""
    emulator = cut_emulator(model, plan)
    if distill_steps <= 0:
        return emulator, None
    if tokenizer is None or not texts:
        raise ValueError("distillation needs a tokenizer and texts")
    return emulator, distill(emulator, model, plan, tokenizer, texts, distill_steps, **distill_options)


def save_emulator(emulator: nn.Module, tokenizer: Any, plan: EmulatorPlan, out: str | os.PathLike[str],
                  source: str, distilled: dict[str, Any] | None = None) -> Path:
    """Write the emulator (weights, config, tokenizer) and its manifest to ``out``; returns the manifest path."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    emulator.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    method = adapter_method(emulator, plan)
    manifest = {
        "format": "peftlab-offsite-emulator/1",
        "source_model": source,
        "block_stack": block_stack(emulator)[0],
        "plan": plan.to_dict(),
        "adapter_method": method,
        "train_hint": f'peftlab train --model {directory} --method "{method}" ...',
        "distillation": distilled,
    }
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an emulator directory; :class:`FileNotFoundError` saying how to make one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an Offsite-Tuning emulator (no {MANIFEST}); "
                                "build one with peftlab offsite emulate --model M ... --out DIR")
    return json.loads(path.read_text())

