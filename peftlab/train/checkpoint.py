"""Checkpoints a run resumes from exactly, written so that a crash never leaves a damaged one.

A checkpoint is a folder ``ROOT/step-N`` (or ``ROOT/final``): the adapter as the user would load it
(what the trainer's ``save_fn`` writes), and under ``trainer_state/`` everything else resuming
needs: the model's trainable tensors (plus buffers and, for a PeftModel, every adapter tensor,
frozen ones included), the optimizer and scheduler, the progress (step, data position, curves,
counters), the state of every random generator, and the training state of methods that act during
training (``pm.training_state``). ``manifest.json`` lists every file with its size and sha256.

Writing: everything goes into a temporary folder ``ROOT/.tmp-<name>-<pid>``, every file is flushed
to disk, the manifest is written last, and one ``rename`` makes it ``ROOT/<name>``; a process killed
at any point leaves either the previous checkpoints or the new one complete. Reading: a checkpoint
whose manifest is missing, or whose files are missing, truncated or changed, is refused with the
reason, and :func:`choose_checkpoint` falls back to the newest good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

MANIFEST = "manifest.json"
STATE_DIR = "trainer_state"
FORMAT = "peftlab-checkpoint/1"
#: Files every resumable checkpoint has, under STATE_DIR.
STATE_FILES = ("progress.json", "tensors.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "hooks.pt")
_STEP_NAME = re.compile(r"step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (the message says why)."""


# -- the folder: atomic write, manifest, verification ---------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: str | Path, name: str, step: int, fill: Callable[[Path], None]) -> Path:
    """Create checkpoint ``root/name``: ``fill(folder)`` writes the files into a temporary folder,
    then the manifest (size and sha256 of each file) is written and the folder renamed into place,
    replacing an older ``root/name``. Returns the final path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    temp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    fill(temp)
    files = {}
    for path in sorted(p for p in temp.rglob("*") if p.is_file()):
        _fsync(path)
        files[path.relative_to(temp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = temp / MANIFEST
    manifest.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1) + "\n")
    _fsync(manifest)
    for folder in {temp, *(p.parent for p in temp.rglob("*"))}:
        _fsync(folder)
    if final.exists():  # a checkpoint of the same name from an earlier, refused or overtaken attempt
        old = root / f".old-{name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        temp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temp.rename(final)
    _fsync(root)
    return final


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint ``folder``; :class:`CheckpointError` when absent or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{MANIFEST} is missing (the checkpoint was never completed)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{MANIFEST} is not a {FORMAT} manifest")
    return manifest


def verify_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Check every file of checkpoint ``folder`` against its manifest (present, same size, same
    sha256) and that it has the files resuming needs; returns the manifest, or raises
    :class:`CheckpointError` naming the first problem."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest["files"]
    for required in (f"{STATE_DIR}/{name}" for name in STATE_FILES):
        if required not in files:
            raise CheckpointError(f"the manifest lists no {required}: not a resumable checkpoint")
    for relative, facts in files.items():
        path = folder / relative
        if not path.is_file():
            raise CheckpointError(f"{relative} is missing")
        size = path.stat().st_size
        if size != facts.get("bytes"):
            raise CheckpointError(f"{relative} has {size} bytes, the manifest says {facts.get('bytes')} "
                                  "(truncated or overwritten)")
        if _sha256(path) != facts.get("sha256"):
            raise CheckpointError(f"{relative}: its sha256 differs from the manifest (the bytes changed)")
    return manifest


def checkpoint_folders(root: str | Path) -> list[Path]:
    """The checkpoints under ``root`` (``step-N`` folders and ``final``), newest first: by the step
    in the name, ``final`` first of all. Temporary folders of unfinished writes are not listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_NAME.match(p.name))),
                   reverse=True)
    final = [root / "final"] if (root / "final").is_dir() else []
    return final + [p for _, p in steps]


def choose_checkpoint(root: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint`, and one message
    per newer checkpoint refused ("<path> refused: <reason>")."""
    refusals = []
    for folder in checkpoint_folders(root):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            refusals.append(f"checkpoint {folder} refused: {err}")
            continue
        return folder, refusals
    return None, refusals


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step-N`` checkpoints under ``root`` (``final`` stays),
    and folders of unfinished writes; returns the checkpoints deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    steps = [p for p in checkpoint_folders(root) if p.name != "final"]
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")] if root.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)
    for old in steps[keep:]:
        shutil.rmtree(old)
    return steps[keep:]


# -- the trainer's state inside a checkpoint -----------------------------------------------------------

def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that resuming restores: trainable parameters, buffers (running
    statistics, masks), and every tensor of a PeftModel's ``adapter_modules`` (frozen random
    projections included), keyed as in ``model.state_dict()``."""
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        trainable = isinstance(value, nn.Parameter) and value.requires_grad
        if trainable or not isinstance(value, nn.Parameter) or key.startswith("adapter_modules."):
            out[key] = value.detach()
    return out


def save_trainer_state(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any, progress: dict[str, Any], rng: dict[str, Any],
                       hooks: dict[str, Any]) -> None:
    """Write the resume files (:data:`STATE_FILES`) into ``folder/trainer_state``: ``progress``
    must be JSON; ``rng`` and ``hooks`` hold tensors, numbers, strings, lists and dicts."""
    from safetensors.torch import save_file  # noqa: PLC0415

    folder = Path(folder) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "progress.json").write_text(json.dumps(progress, allow_nan=True) + "\n")
    tensors = {k: v.cpu().clone().contiguous() for k, v in model_tensors(model).items()}
    save_file(tensors, str(folder / "tensors.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(rng, folder / "rng.pt")
    torch.save(hooks, folder / "hooks.pt")


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """Read what :func:`save_trainer_state` wrote in checkpoint ``checkpoint`` (verified first):
    ``{"progress", "tensors", "optimizer", "scheduler", "rng", "hooks", "step"}``. Raises
    :class:`CheckpointError` when the checkpoint is damaged or unreadable."""
    from safetensors.torch import load_file  # noqa: PLC0415

    checkpoint = Path(checkpoint)
    manifest = verify_checkpoint(checkpoint)
    folder = checkpoint / STATE_DIR
    try:
        state = {"progress": json.loads((folder / "progress.json").read_text()),
                 "tensors": load_file(str(folder / "tensors.safetensors"))}
        for name in ("optimizer", "scheduler", "rng", "hooks"):
            state[name] = torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        raise CheckpointError(f"{checkpoint}: cannot read its trainer state ({type(err).__name__}: {err})") from err
    state["step"] = manifest["step"]
    return state


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's :func:`model_tensors` into ``model`` (in place, on the model's devices);
    a key the model lacks, or a shape that differs, is a :class:`CheckpointError`."""
    own = model.state_dict(keep_vars=True)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(f"the checkpoint holds tensors this model lacks ({', '.join(unknown[:5])}"
                              f"{'...' if len(unknown) > 5 else ''}): it was written for another model or method")
    with torch.no_grad():
        for key, value in tensors.items():
            target = own[key]
            if target.shape != value.shape:
                raise CheckpointError(f"{key}: the checkpoint's shape {tuple(value.shape)} differs from the "
                                      f"model's {tuple(target.shape)}")
            target.copy_(value.to(target.device, target.dtype))
