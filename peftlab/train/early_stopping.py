"""Early stopping: stop when the eval metric has not improved for ``patience`` evaluations."""

from __future__ import annotations

import math
from typing import Any

#: Metrics where lower is better; every other metric (accuracy, F1, MCC, correlations,
#: exact match) is better when higher.
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "mse", "mae", "rmse"})


class EarlyStopping:
    """Watches one eval metric. :meth:`update` takes each evaluation; ``stopped`` turns true after
    ``patience`` evaluations in a row without a strict improvement on the best so far (a NaN value
    never improves). ``best`` and ``best_step`` say where the best was."""

    def __init__(self, metric: str, patience: int) -> None:
        """Watch ``metric`` (a key of the evaluation dict) with the given ``patience`` (>= 1)."""
        if patience < 1:
            raise ValueError(f"early stopping patience must be >= 1, got {patience}")
        self.metric = metric
        self.patience = patience
        self.lower_is_better = metric in LOWER_IS_BETTER
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0
        self.stopped = False

    def update(self, step: int, evaluation: dict[str, Any]) -> bool:
        """Record the evaluation made at ``step``; returns whether training should stop now."""
        if self.metric not in evaluation:
            names = ", ".join(k for k in evaluation if k not in ("examples", "eval_time_s"))
            raise ValueError(f"early stopping watches {self.metric!r}, which the evaluation does not give; "
                             f"it gives {names}")
        value = float(evaluation[self.metric])
        better = math.isfinite(value) and (
            self.best is None or (value < self.best if self.lower_is_better else value > self.best))
        if better:
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        self.stopped = self.bad_evaluations >= self.patience
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON)."""
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "bad_evaluations": self.bad_evaluations, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evaluations, self.stopped = int(state["bad_evaluations"]), bool(state["stopped"])
