"""The no-skill baseline of an eval set, so that a report cannot flatter: the majority class
(classification) or the mean label (regression), scored with the task's own metrics, and the check
of a trained model against it."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from peftlab.train.examples import Examples
from peftlab.train.metrics import compute_metrics

#: Correlation metrics, undefined (NaN) for a constant predictor: its baseline value is 0.
CORRELATIONS = ("pearson", "spearman")


def constant_baseline(examples: Examples) -> dict[str, Any] | None:
    """The eval set's no-skill baseline, None for generative kinds.

    classification: always predict the most frequent class (ties: the lowest id), scored with
    ``examples.metrics`` (accuracy = its share; Matthews correlation = 0). regression: always predict
    the mean label ȳ: mse = (1/n) Σ (yᵢ − ȳ)², correlations 0.
    Returns ``{"kind", "prediction", "metrics"}``.
    """
    if examples.kind == "classification":
        counts = Counter(int(y) for y in examples.labels)
        majority = min(counts, key=lambda c: (-counts[c], c))
        preds = np.full(len(examples), majority)
        scores = compute_metrics(examples.metrics, preds, np.asarray(examples.labels))
        return {"kind": "majority class", "prediction": examples.label_names[majority],
                "share": counts[majority] / len(examples), "metrics": scores}
    if examples.kind == "regression":
        labels = np.asarray(examples.labels, dtype=np.float64)
        mean = float(labels.mean())
        scores = {name: 0.0 for name in examples.metrics if name in CORRELATIONS}
        scores["mse"] = float(np.mean((labels - mean) ** 2))
        return {"kind": "mean prediction", "prediction": mean, "metrics": scores}
    return None


def baseline_check(metric: str, after: dict[str, Any] | None, baseline: dict[str, Any] | None,
                   label_names: list[str]) -> dict[str, Any] | None:
    """Whether the trained model beats the baseline on ``metric``; ``warning`` says plainly when it
    does not, or when it answers one class for every example (a collapse that accuracy on skewed
    data hides). None when there is nothing to compare."""
    if not after or not baseline or metric not in baseline["metrics"]:
        return None
    value, floor = after.get(metric), baseline["metrics"][metric]
    beats = value is not None and math.isfinite(value) and value > floor + 1e-12
    warnings = []
    if not beats:
        shown = "undefined" if value is None or not math.isfinite(value) else f"{value:.4f}"
        warnings.append(f"{metric} {shown} does not beat the {baseline['kind']} baseline {floor:.4f}")
    counts = after.get("predicted_class_counts")
    if counts and sum(1 for c in counts if c) == 1:
        only = next(i for i, c in enumerate(counts) if c)
        name = label_names[only] if only < len(label_names) else str(only)
        warnings.append(f"the model predicts {name!r} for every eval example")
    std = after.get("prediction_std")
    if std is not None and std < 1e-6:
        warnings.append("the model predicts the same value for every eval example")
    return {"metric": metric, "value": value, "baseline": floor, "beats_baseline": beats,
            "warning": "; ".join(warnings) or None}
