"""The split-training wire format: one message = a JSON header and named tensors, in one HTTP body.

    body = u64 little-endian n | n bytes of UTF-8 JSON header | safetensors bytes (absent when no tensors)

safetensors, not pickle: neither side ever runs code the other sent.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

Tensors = dict[str, torch.Tensor]
_LENGTH = struct.Struct("<Q")


class WireError(ValueError):
    """A body that is not a split-training message."""


def encode(header: dict[str, Any], tensors: Tensors | None = None) -> bytes:
    """One message: ``header`` (plain JSON) and ``tensors`` (copied to CPU, contiguous, no grad)."""
    head = json.dumps(header).encode()
    blob = save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}) if tensors else b""
    return _LENGTH.pack(len(head)) + head + blob


def decode(body: bytes) -> tuple[dict[str, Any], Tensors]:
    """``(header, tensors)`` of a message written by :func:`encode`."""
    if len(body) < _LENGTH.size:
        raise WireError(f"a split-training message is at least {_LENGTH.size} bytes, got {len(body)}")
    (n,) = _LENGTH.unpack_from(body)
    end = _LENGTH.size + n
    if end > len(body):
        raise WireError(f"header of {n} bytes announced, body has {len(body) - _LENGTH.size}")
    try:
        header = json.loads(body[_LENGTH.size:end])
    except ValueError as err:
        raise WireError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    return header, (load_tensors(body[end:]) if end < len(body) else {})
