"""Which blocks an Offsite-Tuning emulator keeps (Xiao et al. 2023, "Offsite-Tuning: Transfer Learning
without Full Model"; seed 002 §6.3).

A model with n blocks is cut into three parts: the bottom ``keep_bottom`` and the top ``keep_top``
blocks are the *adapter* (sent to the data owner, trained, sent back), the middle blocks are the
*emulator*, compressed by uniform layer drop: of the m = n − keep_bottom − keep_top middle blocks,
k are kept, the i-th being middle block round(i · (m − 1) / (k − 1)) (the paper's
``uniform_choose_layers``: the first and last middle blocks are always kept).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class PlanError(ValueError):
    """An emulator plan that cannot be built from the given counts; the message says what would work."""


def uniform_layers(count: int, keep: int) -> list[int]:
    """Indices (0-based, within ``count`` blocks) of ``keep`` blocks chosen uniformly:
    round(i · (count − 1) / (keep − 1)) for i = 0 … keep − 1, both ends included (one block: the first)."""
    if not 1 <= keep <= count:
        raise PlanError(f"cannot keep {keep} of {count} middle blocks: keep between 1 and {count}")
    if keep == 1:
        return [0]
    stride = (count - 1) / (keep - 1)
    return [round(i * stride) for i in range(keep)]


@dataclass(frozen=True)
class EmulatorPlan:
    """The blocks of the full model (``num_layers`` of them) that the emulator holds, in order.

    ``middle`` are the full model's indices of the kept middle blocks. The emulator's block j is the
    full model's block :meth:`source_of` (j)."""

    num_layers: int
    keep_bottom: int
    keep_top: int
    middle: tuple[int, ...]

    @property
    def bottom(self) -> list[int]:
        """Full-model indices of the bottom adapter blocks."""
        return list(range(self.keep_bottom))

    @property
    def top(self) -> list[int]:
        """Full-model indices of the top adapter blocks."""
        return list(range(self.num_layers - self.keep_top, self.num_layers))

    @property
    def kept(self) -> list[int]:
        """Full-model index of each emulator block, in emulator order."""
        return [*self.bottom, *self.middle, *self.top]

    @property
    def emulator_layers(self) -> int:
        """Number of blocks in the emulator (adapter blocks included)."""
        return len(self.kept)

    @property
    def adapter_blocks(self) -> list[int]:
        """Emulator indices of the adapter blocks (bottom and top): the ones the data owner trains."""
        n = self.emulator_layers
        return [*range(self.keep_bottom), *range(n - self.keep_top, n)]

    def source_of(self, emulator_index: int) -> int:
        """The full model's index of emulator block ``emulator_index``."""
        return self.kept[emulator_index]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (``from_dict`` reads it back)."""
        return {**asdict(self), "middle": list(self.middle), "kept": self.kept,
                "emulator_layers": self.emulator_layers, "adapter_blocks": self.adapter_blocks}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmulatorPlan:
        """The plan :meth:`to_dict` wrote (extra keys are derived and ignored)."""
        return cls(int(data["num_layers"]), int(data["keep_bottom"]), int(data["keep_top"]),
                   tuple(int(i) for i in data["middle"]))


def plan_emulator(num_layers: int, keep_bottom: int, keep_top: int, *, drop_ratio: float | None = None,
                  emulator_layers: int | None = None) -> EmulatorPlan:
    """The plan for a model of ``num_layers`` blocks: ``keep_bottom`` + ``keep_top`` adapter blocks and,
    of the middle blocks, either ``emulator_layers`` of them or round((1 − drop_ratio) · m) (at least 1).

    Raises :class:`PlanError` naming the counts that would work."""
    if keep_bottom < 0 or keep_top < 1:
        raise PlanError(f"--keep-bottom must be >= 0 and --keep-top >= 1 (got {keep_bottom} and {keep_top}): "
                        "the top blocks carry the task; the emulator's output is distilled below them")
    middle = num_layers - keep_bottom - keep_top
    if middle < 1:
        raise PlanError(f"the model has {num_layers} blocks: keep-bottom {keep_bottom} + keep-top {keep_top} "
                        f"leave no middle block to emulate; use at most {num_layers - 1} adapter blocks in all")
    if (drop_ratio is None) == (emulator_layers is None):
        raise PlanError("give exactly one of --drop-ratio (share of the middle blocks dropped) "
                        "and --emulator-layers (middle blocks kept)")
    if drop_ratio is not None:
        if not 0.0 <= drop_ratio < 1.0:
            raise PlanError(f"--drop-ratio must be in [0, 1), got {drop_ratio}")
        keep = max(1, round((1.0 - drop_ratio) * middle))
    else:
        keep = int(emulator_layers)  # type: ignore[arg-type]
        if not 1 <= keep <= middle:
            raise PlanError(f"--emulator-layers must be between 1 and {middle} (the middle blocks of a "
                            f"{num_layers}-block model with {keep_bottom} + {keep_top} adapter blocks), got {keep}")
    chosen = tuple(keep_bottom + i for i in uniform_layers(middle, keep))
    return EmulatorPlan(num_layers, keep_bottom, keep_top, chosen)
