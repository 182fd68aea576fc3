"""Checkpoints of adapters only when ``transformers.Trainer`` trains a peftlab ``PeftModel``.

A plain ``transformers.Trainer`` already trains a ``PeftModel`` with its default arguments: the
container's ``forward`` carries the base model's signature (``core/signatures.py``), so the
Trainer keeps the right dataset columns and finds the label arguments (``labels`` for a
classification head or a causal LM), and only the adapters' parameters require gradients. What it
cannot do is *save* an adapter: ``Trainer._save`` calls ``save_pretrained`` only on a
``transformers.PreTrainedModel`` or a Hugging Face ``peft.PeftModel`` (an ``isinstance`` test) and
otherwise writes ``model.state_dict()``, the whole base model, to ``model.safetensors`` (and raises
on a base with tied embeddings, GPT-2 or SmolLM2, whose shared tensors safetensors refuses: with
default arguments that happens at the final checkpoint, after training); and
``_load_from_checkpoint`` / ``_load_best_model`` read adapter files only into Hugging Face PEFT
models. So the glue is three overridden methods:

- ``_save`` (``trainer.save_model(dir)`` and every ``checkpoint-N``) writes the adapters with
  ``PeftModel.save_pretrained`` (``adapter_config.json``, ``adapter_model.safetensors`` and
  ``peftlab_config.json``: the adapter named ``default``, else the first, in the directory itself,
  every other one in ``<dir>/<adapter name>/``), then the tokenizer / processor and
  ``training_args.bin`` as the Trainer does; never a base weight.
- ``_load_from_checkpoint`` (``trainer.train(resume_from_checkpoint=...)``) and
  ``_load_best_model`` (``load_best_model_at_end``) copy those files into the adapters already
  placed, in place, so the optimizer's parameters stay the same objects. Optimizer, scheduler,
  RNG and trainer state are restored by the Trainer itself, so a resumed run continues with the
  same losses as an uninterrupted one.

For any other model each method defers to the Trainer's own. Use :class:`AdapterTrainer` in place
of ``transformers.Trainer``, or put :class:`AdapterCheckpoints` first in the bases of your own
Trainer subclass (``class MyTrainer(AdapterCheckpoints, SomeTrainer)``).

The saved directory loads with ``peftlab.load(fresh_base, dir)`` (and, for the methods Hugging
Face PEFT has, with PEFT). Not covered: DeepSpeed ZeRO-3 or FSDP sharded parameters (``_save``
writes the adapter tensors this process holds) and SageMaker model parallelism. With
``label_smoothing_factor > 0`` the Trainer recognises a causal LM by its class name (to shift the
labels), which the container's ``PeftModel[...]`` class does not match: compute that loss yourself
(``compute_loss_func``) for a causal LM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME

from peftlab.core import io
from peftlab.core.model import PeftModel

__all__ = ["AdapterCheckpoints", "AdapterTrainer", "load_adapters_in_place"]


def _root_adapter(pm: PeftModel) -> str:
    """The adapter ``PeftModel.save_pretrained`` writes in the directory itself."""
    if not pm.adapters:
        raise ValueError("the PeftModel has no adapter")
    return "default" if "default" in pm.adapters else pm.adapters[0]


def load_adapters_in_place(pm: PeftModel, directory: str | os.PathLike) -> list[str]:
    """Read what ``pm.save_pretrained(directory)`` wrote into the adapters ``pm`` already has, copying the
    tensors into their parameters (the same objects, so an optimizer built over them stays valid).

    Each adapter of ``pm`` needs its files (the root adapter in ``directory``, the others in
    ``directory/<name>``), written for the same config: every directory is read and its config
    compared before any parameter changes, and each adapter's keys and shapes are checked before
    it is filled. Raises :class:`~peftlab.core.io.AdapterFileError` otherwise, and ``RuntimeError``
    while adapters are merged into the base weights."""
    directory = Path(directory)
    merged = list(pm._state.merged)
    if merged:
        raise RuntimeError(f"adapters {merged} are merged into the base weights; unmerge() before loading a checkpoint")
    root = _root_adapter(pm)
    read = {}
    for name in [root, *(n for n in pm.adapters if n != root)]:
        where = directory if name == root else directory / name
        cfg, tensors = io.read_adapter(where)
        if cfg != pm.configs[name]:
            raise io.AdapterFileError(
                f"{where}: the checkpoint's adapter config {cfg} differs from adapter {name!r}'s {pm.configs[name]}"
            )
        read[name] = (where, tensors)
    for name, (where, tensors) in read.items():
        # load_into_placement checks every key and shape before it copies anything.
        io.load_into_placement(pm.placements[name], tensors, pm.configs[name], where=str(where))
    return list(read)


class AdapterCheckpoints:
    """Mixin for a ``transformers.Trainer`` subclass: a peftlab ``PeftModel`` is saved and
    restored as its adapters only (see the module docstring). Put it before the Trainer class."""

    def _peftlab_model(self, model: Any = None) -> PeftModel | None:
        model = self.model if model is None else model  # type: ignore[attr-defined]
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)  # type: ignore[attr-defined]
        return unwrapped if isinstance(unwrapped, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        pm = self._peftlab_model()
        if pm is None:
            return super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        if not args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        pm.save_pretrained(output_dir)
        # The rest of Trainer._save: the processing class and the training arguments.
        processing_class = getattr(self, "processing_class", None)
        tokenizer = getattr(getattr(self, "data_collator", None), "tokenizer", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        elif tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        pm = self._peftlab_model(model)
        if pm is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        load_adapters_in_place(pm, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        pm = self._peftlab_model()
        if pm is None:
            return super()._load_best_model()  # type: ignore[misc]
        load_adapters_in_place(pm, self.state.best_model_checkpoint)  # type: ignore[attr-defined]
        return None


class AdapterTrainer(AdapterCheckpoints, transformers.Trainer):
    """``transformers.Trainer`` whose ``save_model`` and checkpoints hold a peftlab ``PeftModel``'s
    adapters only, and which resumes from them (any other model: the Trainer unchanged)."""
