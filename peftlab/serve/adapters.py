"""Reading an adapter directory for serving: where it may come from, what it may be, and what the
engine keeps of it.

Checks, before anything is read (each failure is an :class:`InvalidAdapterError` naming it):

* the directory, after resolving symlinks, lies under one of the allowed roots (so ``..`` and
  links pointing elsewhere are refused), and so do the files in it;
* it holds ``adapter_config.json`` and ``adapter_model.safetensors``: weights are read only from
  safetensors, never from pickle files (``adapter_model.bin`` is refused with a note to convert it);
* the weights file is at most ``max_bytes`` and has a well-formed safetensors header.

The config and the tensors are then read with the library's own code (``core/io.py``), the deltas
built on the base model and filled (``build_placement``, ``io.load_into_placement``): an adapter
made for another base model or with a bad config is refused there.

What the engine keeps (:class:`ReadAdapter`): for LoRA-family adapters on linear layers, only each
module's low-rank factors ``(A, B)`` with ΔW = B A, the scaling folded into B (:func:`lora_factors`;
they go into the adapter bank); for other layer methods, the placed deltas themselves, which the
engine attaches to its ``PeftModel`` and routes per row; and, for the model-site parts (prefixes,
soft prompts; alone or in a union such as MAM or UniPELT), what they put before a request's prompt
(:mod:`~peftlab.serve.virtual`).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from peftlab.core import io
from peftlab.core.config import ConfigError
from peftlab.core.model import build_placement
from peftlab.core.targeting import TargetError
from peftlab.methods.reparam.lora.deltas import LoraLinear

from .errors import InvalidAdapterError
from .virtual import VirtualInput, check_virtual_parts, has_gated_layers, virtual_input

#: Files that hold pickled weights: never opened.
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


@dataclass
class ReadAdapter:
    """An adapter read from disk: its config; its layer parts as LoRA factors (``factors``: module
    name -> (A (r, in), B (out, r) with the scaling folded in)) or as placed deltas (``placement``),
    or neither; and its model-site parts (``virtual``: prefix keys and values, soft prompt), if any.
    ``gated``: some part averages a gate over a call's positions (a prefill must not pad its row)."""

    config: Any
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    placement: list | None
    nbytes: int
    virtual: VirtualInput | None = None
    gated: bool = False

    @property
    def kind(self) -> str:
        """``bank`` (LoRA family), ``routed`` (attached to the PeftModel, routed per row) or
        ``virtual`` (only model-site parts)."""
        return "bank" if self.factors is not None else "routed" if self.placement else "virtual"


def resolve_adapter_dir(path: str | os.PathLike, allowed_roots: Sequence[str | os.PathLike] | None,
                        max_bytes: int) -> Path:
    """The real directory of an adapter, after every check of the module docstring."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidAdapterError(f"adapter path must be a non-empty string, got {path!r}")
    try:
        real = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise InvalidAdapterError(f"adapter directory {str(path)!r} does not exist ({e.__class__.__name__})") from None
    roots = None if allowed_roots is None else [Path(r).expanduser().resolve() for r in allowed_roots]
    _inside(real, roots, str(path))
    if not real.is_dir():
        raise InvalidAdapterError(f"adapter path {str(path)!r} is not a directory (expected a directory with "
                                  f"{io.CONFIG_NAME} and {io.WEIGHTS_NAME})")
    weights = real / io.WEIGHTS_NAME
    if not weights.exists():
        pickled = [n for n in PICKLE_NAMES if (real / n).exists()]
        if pickled:
            raise InvalidAdapterError(
                f"adapter {str(path)!r} has {pickled[0]} (a pickle file) and no {io.WEIGHTS_NAME}: pickle files are "
                "never loaded, as they can run code. Convert it once where you trust it: "
                "safetensors.torch.save_file(torch.load(f), 'adapter_model.safetensors')")
        raise InvalidAdapterError(f"adapter directory {str(path)!r} has no {io.WEIGHTS_NAME}; "
                                  f"found: {sorted(p.name for p in real.iterdir())[:20]}")
    if not (real / io.CONFIG_NAME).exists():
        raise InvalidAdapterError(f"adapter directory {str(path)!r} has no {io.CONFIG_NAME}")
    for name in io.ADAPTER_FILES:  # a file that is itself a link must not lead outside the roots
        f = real / name
        if f.exists():
            _inside(f.resolve(), roots, str(f))
            if not f.resolve().is_file():
                raise InvalidAdapterError(f"{f} is not a regular file")
    size = weights.stat().st_size
    if size > max_bytes:
        raise InvalidAdapterError(f"adapter {str(path)!r} is too big: {io.WEIGHTS_NAME} has {size:,} bytes, "
                                  f"the limit is {max_bytes:,} (max_adapter_bytes)")
    check_safetensors_header(weights.resolve(), size)
    return real


def _inside(real: Path, roots: list[Path] | None, shown: str) -> None:
    if roots is None:
        return
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise InvalidAdapterError(
            f"adapter path {shown!r} (resolved: {str(real)!r}) is outside the allowed roots "
            f"{[str(r) for r in roots]}; put the adapter under one of them (symlinks are resolved first)")


def check_safetensors_header(path: Path, size: int) -> None:
    """Refuse a file that does not start with a safetensors header: 8 bytes of little-endian header
    length, then that many bytes of JSON describing tensors that fit in the file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidAdapterError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > min(size - 8, 100 * 2**20):
            raise InvalidAdapterError(f"{path} is not a safetensors file (header length {n} does not fit its {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidAdapterError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InvalidAdapterError(f"{path} is not a safetensors file (its header is not a JSON object)")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= size - 8 - n):
            raise InvalidAdapterError(f"{path} is not a valid safetensors file (tensor {key!r} lies outside the file)")


def read_adapter_dir(real: Path, model: nn.Module,
                     base_access: Callable[[], ContextManager] = contextlib.nullcontext) -> ReadAdapter:
    """Read a checked directory (:func:`resolve_adapter_dir`) with the library's code and build it
    for ``model``; :class:`InvalidAdapterError` for a bad config, another base, or a model-site part
    the engine cannot serve (:func:`~peftlab.serve.virtual.check_virtual_parts`). Building reads the base model (PiSSA's
    residual, a prefix's token init): it runs inside ``base_access()``, which the engine makes a
    moment between two steps with the original (unmerged) weights; the files are read before."""
    try:
        cfg, tensors = io.read_adapter(real)
    except io.AdapterFileError as e:
        raise InvalidAdapterError(f"adapter {str(real)!r}: {e}") from None
    has_virtual = check_virtual_parts(cfg, repr(str(real)))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    signature = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    templates = _TEMPLATES.setdefault(model, {})
    if signature in templates:  # a config seen before: its keys, shapes and scalings are known
        return ReadAdapter(cfg, templates[signature].factors(tensors, str(real)), None, nbytes)
    try:
        with base_access():
            placement = build_placement(model, cfg)
        io.load_into_placement(placement, tensors, cfg, where=str(real))
    except io.AdapterFileError as e:
        raise InvalidAdapterError(str(e)) from None
    except (ConfigError, TargetError, TypeError, ValueError) as e:
        raise InvalidAdapterError(f"adapter {str(real)!r} does not fit this model: {e}") from None
    for _, _, delta in placement:
        delta.eval()
        delta.requires_grad_(False)
    virtual = virtual_input(placement, model) if has_virtual else None
    layers = [(part, name, d) for part, name, d in placement if d.site != "model"]
    factors = lora_factors(layers) if layers else None
    if factors is not None and virtual is None and not any(d.residual for _, _, d in layers):
        templates[signature] = LoraTemplate.of(layers, cfg)
    gated = has_gated_layers(layers) or (virtual is not None and virtual.gates is not None)
    return ReadAdapter(cfg, factors, layers if factors is None and layers else None, nbytes, virtual, gated)


#: Per base model: {config signature: LoraTemplate}, learnt from the first adapter of each config.
_TEMPLATES: "weakref.WeakKeyDictionary[nn.Module, dict[str, LoraTemplate]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LoraTemplate:
    """What the library's loading code established for one plain-LoRA config on one base model
    (file keys, shapes, scalings, dtype), so that a thousand adapters of that config are checked
    against it and read without building deltas each time."""

    modules: dict[str, tuple[str, str, float]]  # module -> (key of A, key of B, scaling)
    shapes: dict[str, tuple[int, ...]]  # file key -> shape
    dtype: torch.dtype

    @classmethod
    def of(cls, placement: list, cfg: Any) -> "LoraTemplate":
        """The template of a placement built and filled by the library (plain LoRA only)."""
        modules, shapes = {}, {}
        for part, module_name, delta in placement:
            keys = [io.file_key(cfg, part, module_name, k) for k in ("lora_A.weight", "lora_B.weight")]
            modules[module_name] = (keys[0], keys[1], float(delta.scaling))
            shapes[keys[0]] = tuple(delta.lora_A.weight.shape)
            shapes[keys[1]] = tuple(delta.lora_B.weight.shape)
        return cls(modules, shapes, placement[0][2].lora_A.weight.dtype)

    def factors(self, tensors: dict[str, torch.Tensor], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The factors of a file of this config; the same key and shape checks as
        ``io.load_into_placement`` (:class:`InvalidAdapterError` naming them)."""
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".base_layer.weight")}
        missing, unexpected = sorted(set(self.shapes) - set(tensors)), sorted(set(tensors) - set(self.shapes))
        if missing or unexpected:
            raise InvalidAdapterError(
                f"adapter {where} does not fit this model: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Was it made for another base model?")
        for k, shape in self.shapes.items():
            if tuple(tensors[k].shape) != shape:
                raise InvalidAdapterError(f"adapter {where}: {k} has shape {tuple(tensors[k].shape)} in the file but "
                                          f"this model needs {shape}. Was it made for another base model?")
        return {m: (tensors[a].to(self.dtype).contiguous(), (tensors[b].to(self.dtype) * s).contiguous())
                for m, (a, b, s) in self.modules.items()}


def lora_factors(placement: list) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """{module: (A, B)} with ΔW = B A (shapes (r, in) and (out, r); the scaling folded into B) when
    every delta is plain LoRA on a linear layer (LoRA, rsLoRA, LoRA-FA; PiSSA / OLoRA as rank 2r:
    A' = [A; A₀], B' = s [B, −B₀]); None otherwise (DoRA, embeddings, other methods)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for _, module_name, delta in placement:
        if type(delta) is not LoraLinear or not module_name or module_name in out:
            return None
        with torch.no_grad():
            A, B = delta.lora_A.weight.detach(), delta.lora_B.weight.detach() * delta.scaling
            if delta.residual:
                A = torch.cat([A, delta.A0])
                B = torch.cat([B, -delta.scaling * delta.B0], dim=1)
        out[module_name] = (A.cpu().contiguous(), B.cpu().contiguous())
    return out or None
