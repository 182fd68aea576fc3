"""What the hybrids share: the prefix options they pass through to their prefix part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.methods.additive.prefix import PrefixConfig


@dataclass(kw_only=True)
class PrefixOptions:
    """Config mixin of a hybrid with a prefix part: ``length``, ``projection``, ``hidden``, ``init``
    (meanings and checks: :class:`~peftlab.methods.additive.prefix.PrefixConfig`). A hybrid
    redeclares ``length`` with its own default."""

    length: int = 20
    projection: bool = False
    hidden: int = 512
    init: str | None = None

    def prefix_part(self, **more: Any) -> PrefixConfig:
        """The prefix part with these options (and ``more`` fields, e.g. ``gate=True``)."""
        return PrefixConfig(length=self.length, projection=self.projection, hidden=self.hidden, init=self.init, **more)
