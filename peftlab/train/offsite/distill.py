"""Distilling an emulator's middle blocks against the full model's (Offsite-Tuning's optional step).

Both models get the same text; their bottom blocks are the same, so the middle blocks of each see
the same input h. With t the full model's hidden state after its middle blocks and s the emulator's,

    L = mean over real (non-padding) tokens of ‖t − s‖² / (d · σ²),   σ² = mean(t²) over those tokens,

the normalised squared error of the paper's code. Only the emulator's middle blocks learn; the
adapter blocks stay exactly the original's. Both forwards stop at the first top block (a hook raises
once it has the hidden state), so neither the top blocks nor the output head run.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.train.data import load_task
from peftlab.train.examples import DataError
from peftlab.train.offsite.plan import EmulatorPlan
from peftlab.train.offsite.stack import block_stack


class _Captured(Exception):
    """Raised by a forward hook to stop the model once the wanted hidden state is in hand."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("hidden state captured")
        self.hidden = hidden


def hidden_before(model: nn.Module, block: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden state entering block ``block`` of the model's stack (the output of block − 1), computed
    without running that block or anything after it."""
    _, stack = block_stack(model)

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        raise _Captured(hidden)

    handle = stack[block].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(**batch)
    except _Captured as done:
        return done.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"block {block} of the stack never ran")


def normalized_mse(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """mean ‖t − s‖² / (d σ²) over the tokens where ``mask`` is 1, σ² = mean(t²) there (see the module)."""
    t, s = teacher.float(), student.float()
    keep = torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device) if mask is None else mask.bool()
    t, s = t[keep], s[keep]
    return (t - s).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def distill_texts(source: str, limit: int, seed: int = 0, text_cols: Sequence[str] | None = None) -> list[str]:
    """Texts to distill on: a registered task's train split (its text columns joined by a space), a
    ``.txt`` file (one text per non-empty line) or a ``.json`` / ``.jsonl`` file of records
    (``text_cols`` joined; default: every string field). A random ``limit`` of them, chosen with ``seed``."""
    path = Path(source)
    if path.is_file():
        texts = _file_texts(path, text_cols)
    elif path.suffix in (".txt", ".json", ".jsonl"):
        raise DataError(f"--distill-data {source}: no such file")
    else:
        texts = [" ".join(t) for t in load_task(source, "train", limit=limit, seed=seed).texts]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"--distill-data {source}: no text found")
    if len(texts) > limit:
        texts = random.Random(seed).sample(texts, limit)
    return texts


def _file_texts(path: Path, text_cols: Sequence[str] | None) -> list[str]:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return raw.splitlines()
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix == ".json":
        records = json.loads(raw)
    else:
        raise DataError(f"--distill-data {path}: use a task name, a .txt, .json or .jsonl file")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"--distill-data {path}: expected a list of JSON objects")
    texts = []
    for i, record in enumerate(records):
        cols = list(text_cols) if text_cols else [k for k, v in record.items() if isinstance(v, str)]
        missing = [c for c in cols if c not in record]
        if missing:
            raise DataError(f"{path} record {i} has no field {missing[0]!r}; fields are: {', '.join(record)}")
        texts.append(" ".join(str(record[c]) for c in cols if record[c]))
    return texts


def distill(emulator: nn.Module, teacher: nn.Module, plan: EmulatorPlan, tokenizer: Any, texts: Sequence[str],
            steps: int, batch_size: int = 8, max_length: int = 128, lr: float = 1e-4, seed: int = 0,
            progress: bool = True) -> dict[str, Any]:
    """Train the emulator's middle blocks for ``steps`` AdamW steps so that its hidden state before the
    top blocks matches the full model's (:func:`normalized_mse`); returns the loss curve.

    ``emulator`` is changed in place; ``teacher`` (the full model) is only read."""
    if steps < 1:
        raise ValueError(f"distill steps must be >= 1, got {steps}")
    _, stack = block_stack(emulator)
    middle = [stack[j] for j in range(plan.keep_bottom, plan.emulator_layers - plan.keep_top)]
    frozen = {n: p.requires_grad for n, p in emulator.named_parameters()}
    for p in emulator.parameters():
        p.requires_grad_(False)
    params = [p for block in middle for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    teacher_block = plan.num_layers - plan.keep_top
    student_block = plan.emulator_layers - plan.keep_top
    curve: list[float] = []
    was = (emulator.training, teacher.training)
    # Dropout off in both: the two middle parts must see the same input (the shared bottom blocks' output).
    emulator.eval()
    teacher.eval()
    try:
        for _ in tqdm(range(steps), desc="distill", unit="step", disable=not progress, dynamic_ncols=True):
            batch = dict(tokenizer(rng.sample(list(texts), min(batch_size, len(texts))), return_tensors="pt",
                                   padding=True, truncation=True, max_length=max_length))
            with torch.no_grad():
                target = hidden_before(teacher, teacher_block, batch)
            loss = normalized_mse(target, hidden_before(emulator, student_block, batch), batch.get("attention_mask"))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(float(loss.detach()))
    finally:
        for n, p in emulator.named_parameters():
            p.requires_grad_(frozen[n])
        emulator.train(was[0])
        teacher.train(was[1])
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "max_length": max_length,
            "texts": len(texts), "loss_curve": curve, "loss_first": curve[0], "loss_last": curve[-1]}
