"""dLoRA's merge decision (Wu et al. 2024; seed 002 §6.2): when one adapter dominates the live
requests, fold it into the base weights and serve its rows at the base model's speed; when the mix
returns, unfold it.

The policy is a small pure function of the live requests' adapters (running and queued), with
hysteresis so the engine does not flip at every step:

* merge adapter a when its share of live requests is at least ``merge_share`` and there are at least
  ``min_requests`` of them;
* keep the merged adapter while its share stays at least ``unmerge_share`` (< ``merge_share``);
* otherwise unmerge (and merge another adapter if it now dominates).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class MergePolicy:
    """When to merge one adapter into the base (see the module docstring)."""

    merge_share: float = 0.9
    unmerge_share: float = 0.6
    min_requests: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.unmerge_share <= self.merge_share <= 1.0:
            raise ValueError(f"MergePolicy: expected 0 < unmerge_share <= merge_share <= 1, got "
                             f"unmerge_share={self.unmerge_share}, merge_share={self.merge_share}")
        if self.min_requests < 1:
            raise ValueError(f"MergePolicy: min_requests must be >= 1, got {self.min_requests}")

    def decide(self, counts: Mapping[object, int], merged: object | None,
               mergeable: Collection[object] | None = None) -> object | None:
        """The adapter that should be merged now (None: none).

        ``counts``: live requests per adapter key (None for the base model: those count in the
        total but are never merged); ``merged``: the adapter merged now, or None; ``mergeable``: the
        keys that may be merged (default: every key but None).
        """
        total = sum(counts.values())
        if total < self.min_requests:
            return None
        if merged is not None and counts.get(merged, 0) >= self.unmerge_share * total:
            return merged
        top, n = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
        if top is None or (mergeable is not None and top not in mergeable):
            return None
        return top if n >= self.merge_share * total else None
