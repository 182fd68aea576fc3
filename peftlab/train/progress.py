"""How far a training run has come: step, counters and curves, kept as JSON in each checkpoint so
that a resumed run reports the whole run, not only its own part."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunProgress:
    """The loop's running totals. ``settings`` records what must not change between a run and its
    resumption (steps planned, gradient accumulation, schedule); ``data`` is the position of the
    batch stream (:meth:`~peftlab.train.data_order.BatchStream.position`, without its tensor)."""

    settings: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    finished: bool = False
    micro_batches: int = 0
    examples: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    loss_curve: list[float] = field(default_factory=list)
    lr_curve: list[float] = field(default_factory=list)
    grad_norm_curve: list[float | None] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, int] = field(default_factory=dict)
    early_stopping: dict[str, Any] | None = None

    def record_step(self, loss: float, lr: float, grad_norm: float | None, micro_batches: int, examples: int,
                    tokens: int, seconds: float) -> None:
        """Count one optimizer step."""
        self.step += 1
        self.loss_curve.append(loss)
        self.lr_curve.append(lr)
        self.grad_norm_curve.append(grad_norm)
        self.micro_batches += micro_batches
        self.examples += examples
        self.tokens += tokens
        self.train_time_s += seconds

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunProgress:
        """The inverse of :meth:`to_json` (unknown keys are ignored)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def check_same_settings(self, settings: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming each setting that differs from the one the run was saved with:
        resuming would not continue the same run."""
        differ = [f"{k}={settings.get(k)!r} (saved: {v!r})" for k, v in self.settings.items() if settings.get(k) != v]
        if differ:
            raise ValueError("the checkpoint was written by a run with other settings; resuming would not continue "
                             f"the same run: {', '.join(differ)}")
