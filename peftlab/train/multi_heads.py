"""Task heads of several adapters over one base (multi-adapter runs, :mod:`peftlab.train.multi`).

Each adapter carries its task's head as a ``modules_to_save`` copy (core's ``HeadCopy``). In a mixed
batch the head copies of every row's adapter write into one output tensor, so they must share an
output width: the base is loaded with the widest task's head (``W`` outputs) and each adapter's head
is its own task's freshly initialised head (``k`` outputs, as ``peftlab train`` alone gives it)
*widened* to ``W`` rows, the extra rows zero. Only the first ``k`` logits of a row are read, so the
extra rows get no gradient and stay zero, and the first ``k`` outputs are those of the k-wide head.
Saving narrows the head back to ``k`` rows, so the files load onto a base made for that task alone.

:class:`TaskView` is one adapter's view of the shared model: every row routed to that adapter,
logits cut to its task's width. The single-adapter trainer and evaluation run on it unchanged.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from peftlab.core.delta import HeadCopy
from peftlab.core.model import PeftModel
from peftlab.train.evaluation import output_field


def output_layer(head: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of ``head`` (its name inside ``head``, "" for the head itself): the
    layer whose rows are the head's outputs (BERT's ``classifier``, Llama's ``score``, RoBERTa's
    ``classifier.out_proj``). Raises ``ValueError`` when the head has no linear layer."""
    found = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"task head {type(head).__name__} has no nn.Linear output layer: a multi-adapter run "
                         "cannot give adapters heads of different widths")
    return found[-1]


def _with_rows(head: nn.Module, width: int) -> nn.Module:
    """A copy of ``head`` whose output layer has ``width`` rows: the first ``min(width, k)`` are
    ``head``'s, any further rows (and their biases) zero."""
    name, layer = output_layer(head)
    rows = min(width, layer.out_features)
    new = nn.Linear(layer.in_features, width, bias=layer.bias is not None,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:rows].copy_(layer.weight[:rows])
        if layer.bias is not None:
            new.bias.zero_()
            new.bias[:rows].copy_(layer.bias[:rows])
    if not name:
        return new
    out = copy.deepcopy(head)
    out.set_submodule(name, new)
    return out


def head_width(head: nn.Module) -> int:
    """Number of outputs of ``head`` (rows of its output layer)."""
    return output_layer(head)[1].out_features


def head_copies(pm: PeftModel, adapter: str) -> dict[str, HeadCopy]:
    """{module name: the ``modules_to_save`` copy} of one adapter."""
    return {name: delta for _, name, delta in pm.placements[adapter] if isinstance(delta, HeadCopy)}


def install_task_head(pm: PeftModel, adapter: str, module_name: str, task_head: nn.Module) -> None:
    """Put ``task_head``'s values (k outputs) into ``adapter``'s copy of base module ``module_name``
    (W ≥ k outputs), widened with zero rows. The copy keeps its parameter objects."""
    copies = head_copies(pm, adapter)
    if module_name not in copies:
        raise ValueError(f"adapter {adapter!r} has no modules_to_save copy of {module_name!r} "
                         f"(it has {sorted(copies) or 'none'}): its task head cannot be installed")
    target = copies[module_name].module
    width, k = head_width(target), head_width(task_head)
    if k > width:
        raise ValueError(f"adapter {adapter!r}: its task head has {k} outputs, the shared base's "
                         f"{module_name!r} only {width}; load the base with the widest task's head")
    target.load_state_dict(_with_rows(task_head, width).state_dict())


@contextlib.contextmanager
def narrowed_heads(pm: PeftModel, adapter: str, widths: Mapping[str, int]) -> Iterator[None]:
    """Within the block, ``adapter``'s head copies named in ``widths`` have that many outputs (the
    trained first rows; what its files and report should hold); restored on exit."""
    copies = head_copies(pm, adapter)
    kept = {name: copies[name].module for name in widths}
    try:
        for name, k in widths.items():
            if head_width(kept[name]) != k:
                copies[name].module = _with_rows(kept[name], k)
        yield
    finally:
        for name, module in kept.items():
            copies[name].module = module


class TaskView(nn.Module):
    """One adapter of a shared :class:`PeftModel` seen as a model of its own: ``view(**batch)``
    routes every row to ``adapter`` (``adapter_names``; the other adapters keep their trainable
    state) and returns ``{"logits": logits[..., :width]}`` without a loss, so the caller computes
    the loss of the task's own width (:func:`peftlab.train.evaluation.forward_loss`)."""

    def __init__(self, pm: PeftModel, adapter: str, width: int) -> None:
        """View ``adapter`` of ``pm``, reading the first ``width`` logits of each row."""
        super().__init__()
        self.pm = pm
        self.adapter = adapter
        self.width = width

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        """The adapter's logits for ``batch`` (``labels`` are ignored here)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        rows = int(next(iter(inputs.values())).shape[0])
        out = self.pm(**inputs, adapter_names=[self.adapter] * rows)
        return {"logits": output_field(out, "logits", 0)[..., :self.width]}
