"""Provenance tag attached to every model returned by :func:`peftlab.zoo.load`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTRIBUTE = "peftlab_zoo"


@dataclass(frozen=True)
class ZooInfo:
    """Where a loaded model came from.

    Attributes:
        name: the zoo name (``"minilm"``, ``"smollm2"``) or ``"directory"``.
        task: the task it was loaded for.
        path: the directory the weights were read from.
        from_cache: True when the weights were read from peftlab's own conversion cache
            (for ``smollm2``: False only on the call that dequantized the GGUF file).
    """

    name: str
    task: str
    path: str
    from_cache: bool = False


def tag(model: torch.nn.Module, info: ZooInfo) -> None:
    """Attach ``info`` to ``model`` as ``model.peftlab_zoo`` (a plain attribute, never saved)."""
    setattr(model, ATTRIBUTE, info)


def zoo_info(model: torch.nn.Module) -> ZooInfo | None:
    """The :class:`ZooInfo` of a model returned by :func:`peftlab.zoo.load`, or None."""
    return getattr(model, ATTRIBUTE, None)
