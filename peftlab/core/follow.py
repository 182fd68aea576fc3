"""Adapters follow their base model when the user moves or casts it.

``pm.model`` is the user's own object, so they may call ``model.to(torch.bfloat16)`` or
``model.to("cuda")`` on it directly; that moves the base but not the deltas, which live in
``pm.adapter_modules``. So that the next call neither fails inside a layer ("mat1 and mat2 must
have the same dtype") nor mixes devices, every dispatcher (and the container, for model-level
deltas) holds a :class:`BaseRef`: one floating-point parameter of its base module, found once, and
the ``(device, dtype)`` it last saw there. A call reads that one parameter's device and dtype (a
dict lookup and two attribute reads, never a scan of the parameters); only when they changed are
the deltas looked at, by :func:`follow`:

- device: the deltas move to the base's new device (``nn.Module.to``: parameters keep their
  identity, so an optimizer that holds them still does);
- dtype: the deltas take the dtype an adapter created on that base gets (:func:`adapter_dtype`:
  float32 for a half-precision base, whose forward casts, as Hugging Face PEFT does; the base's own
  dtype otherwise), unless they already have the base's own dtype (``pm.to(torch.bfloat16)`` asked
  for bf16 adapters: kept);
- ``meta``: moving there would throw the adapters' values away, so a call that would use them
  raises :class:`AdapterPlacementError`, which says to call ``pm.to("meta")`` (or to move the model
  back); the adapters keep their values meanwhile.

``pm.to(...)`` moves the base and the adapters together (``PeftModel`` is an ``nn.Module`` holding
both); the next call then finds them agreeing and changes nothing.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from peftlab.core.quantized import float_dtype, is_4bit_param


class AdapterPlacementError(RuntimeError):
    """The base model was moved where its adapters cannot follow by themselves (``meta``)."""


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of an adapter placed on a base of ``base_dtype``: float32 for a floating dtype
    narrower than 32 bits (the adapter's forward casts), the base's own dtype otherwise."""
    if base_dtype.is_floating_point and torch.finfo(base_dtype).bits < 32:
        return torch.float32
    return base_dtype


def _first_float(module: nn.Module) -> tuple[nn.Module, str, bool] | None:
    """(owner module, name, is_parameter) of the first floating-point parameter (else buffer); a
    4-bit quantized weight counts, standing for the float dtype it dequantizes to."""
    for table in ("_parameters", "_buffers"):
        for owner in module.modules():
            for name, t in getattr(owner, table).items():
                if t is not None and (t.is_floating_point() or is_4bit_param(t)):
                    return owner, name, table == "_parameters"
    return None


def _float_tensor(module: nn.Module) -> torch.Tensor | None:
    found = _first_float(module)
    if found is None:
        return None
    owner, name, is_param = found
    return (owner._parameters if is_param else owner._buffers)[name]


class BaseRef:
    """One floating-point tensor of a base module, standing for the module's device and dtype.

    ``changed()`` is the per-call check: it reads that tensor's device and dtype and compares them
    with what was last accepted (nothing at first, so the first call always checks the deltas)."""

    __slots__ = ("_table", "_name", "_seen", "_4bit")

    def __init__(self, module: nn.Module):
        found = _first_float(module)
        if found is None:  # nothing floating (e.g. a quantized layer without a bias): no following
            self._table: dict | None = None
            self._name = ""
        else:
            owner, self._name, is_param = found
            self._table = owner._parameters if is_param else owner._buffers
        self._seen: tuple[torch.device, torch.dtype] | None = None
        # A 4-bit weight (uint8 storage) stands for the float dtype it dequantizes to.
        self._4bit = self._table is not None and is_4bit_param(self._table.get(self._name))

    def current(self) -> tuple[torch.device, torch.dtype] | None:
        """The base's (device, dtype) now, or None if it has no floating-point tensor."""
        if self._table is None:
            return None
        t = self._table.get(self._name)
        return None if t is None else (t.device, float_dtype(t) if self._4bit else t.dtype)

    def changed(self) -> bool:
        """Whether the base moved or was cast since :meth:`accept` last ran."""
        if self._table is None:
            return False
        t = self._table.get(self._name)
        if t is None:
            return False
        dtype = float_dtype(t) if self._4bit else t.dtype
        return self._seen is None or t.device != self._seen[0] or dtype != self._seen[1]

    def accept(self) -> None:
        """The deltas agree with the base as it is now."""
        self._seen = self.current()


def follow(deltas: Iterable[nn.Module], ref: BaseRef, where: str, in_use: bool) -> bool:
    """Move or cast ``deltas`` to agree with the base ``ref`` stands for (module docstring).

    Returns whether they now agree (then ``ref`` has accepted the base's new state). A base on
    ``meta`` with deltas elsewhere, or deltas on ``meta`` with the base elsewhere, raises
    :class:`AdapterPlacementError` when ``in_use`` (the call is about to use them); otherwise
    nothing is moved and False is returned, to check again at a later call.
    """
    now = ref.current()
    if now is None:
        return False
    device, dtype = now
    pending = []
    for delta in deltas:
        t = _float_tensor(delta)
        if t is None:
            continue
        want = t.dtype if t.dtype in (dtype, adapter_dtype(dtype)) else adapter_dtype(dtype)
        if t.device != device or t.dtype != want:
            pending.append((delta, t.device, want))
    off_meta = any(d_dev.type != "meta" for _, d_dev, _ in pending)
    on_meta = any(d_dev.type == "meta" for _, d_dev, _ in pending)
    if (off_meta if device.type == "meta" else on_meta) and not in_use:
        return False
    if device.type == "meta" and off_meta:
        raise AdapterPlacementError(_meta_message(where, pending[0][1]))
    if device.type != "meta" and on_meta:
        raise AdapterPlacementError(
            f"the adapters are on 'meta' (they hold no values) but the base model is on {device} ({where}): "
            "call pm.to_empty(device=...) and load the adapter again, or pm.to('meta') to run on meta."
        )
    for delta, _, want in pending:
        delta.to(device=device, dtype=want)
    ref.accept()
    return True


def _meta_message(where: str, adapters_on: torch.device) -> str:
    return (
        f"the base model was moved to 'meta' ({where}) but its adapters are on {adapters_on}: they are not "
        "moved there by themselves, since that would lose their values. Call pm.to('meta') to move the "
        "adapters too, or move the model back (e.g. model.to_empty(...) and load its weights) to keep them."
    )


def refuse_meta(deltas: Iterable[nn.Module], where: str) -> None:
    """Raise :class:`AdapterPlacementError` if any of ``deltas`` is off ``meta`` (the base is on it):
    the container's early check, before any layer runs."""
    for delta in deltas:
        t = _float_tensor(delta)
        if t is not None and t.device.type != "meta":
            raise AdapterPlacementError(_meta_message(where, t.device))
