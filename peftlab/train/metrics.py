"""Evaluation metrics written with numpy only: accuracy, binary F1, Pearson, Spearman and the
Matthews correlation coefficient."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike


def _pair(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to their label."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1(preds: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class: 2·TP / (2·TP + FP + FN); 0.0 when that is 0/0."""
    p, y = _pair(preds, labels)
    tp = float(np.sum((p == positive) & (y == positive)))
    fp = float(np.sum((p == positive) & (y != positive)))
    fn = float(np.sum((p != positive) & (y == positive)))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def pearson(preds: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation; NaN when either side is constant (undefined)."""
    p, y = _pair(preds, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    dp, dy = p - p.mean(), y - y.mean()
    denom = np.sqrt(np.sum(dp * dp) * np.sum(dy * dy))
    return float(np.sum(dp * dy) / denom) if denom > 0 else float("nan")


def rankdata(values: ArrayLike) -> np.ndarray:
    """Ranks starting at 1, ties sharing the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(v.size, dtype=np.float64)
    sorted_v = v[order]
    # Start index of each run of equal values in the sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1..end
    return ranks


def spearman(preds: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation: Pearson of the tie-averaged ranks."""
    p, y = _pair(preds, labels)
    return pearson(rankdata(p), rankdata(y))


def matthews_corrcoef(preds: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient (multi-class form); 0.0 when undefined."""
    p, y = _pair(preds, labels)
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (codes[: y.size], codes[y.size:]), 1.0)
    t, pk = conf.sum(axis=1), conf.sum(axis=0)
    n, c = conf.sum(), np.trace(conf)
    cov_yp = c * n - t @ pk
    cov_pp = n * n - pk @ pk
    cov_yy = n * n - t @ t
    denom = np.sqrt(cov_pp * cov_yy)
    return float(cov_yp / denom) if denom > 0 else 0.0


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "pearson": pearson,
    "spearman": spearman,
    "mcc": matthews_corrcoef,
    "matthews_corrcoef": matthews_corrcoef,
}


def compute_metrics(names: Sequence[str], preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """{name: value} for each metric in ``names`` (see :data:`METRICS` for the known names)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    return {name: METRICS[name](preds, labels) for name in names}
