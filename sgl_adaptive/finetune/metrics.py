"""AUROC and Brier score of self-evaluation scores against "No" labels (1 = the response is kept), and a
percentile bootstrap over groups (prompts) for their intervals."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting one half
    (Mann-Whitney with mid-ranks). nan when one class is absent."""
    if len(scores) != len(positives):
        raise ValueError("scores and labels differ in length")
    pos = np.asarray(positives, dtype=bool)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(np.asarray(scores, dtype=float), return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2  # 1-based mid-rank of each tied run
    rank_sum = float(mid_ranks[inverse.reshape(-1)][pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def brier(scores: Sequence[float], targets: Sequence[float]) -> float:
    """Mean squared error of the scores against 0/1 (or soft) targets; nan when empty."""
    if len(scores) != len(targets):
        raise ValueError("scores and targets differ in length")
    if not scores:
        return math.nan
    return sum((s - t) ** 2 for s, t in zip(scores, targets, strict=True)) / len(scores)


def bootstrap_ci(
    groups: int,
    statistic: Callable[[np.ndarray], float],
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> list[float]:
    """Percentile bootstrap interval [low, high] of ``statistic`` over ``groups`` groups: each resample draws
    ``groups`` group indices with replacement (``statistic`` gets that index array). Resamples where the
    statistic is nan (e.g. a class absent) are skipped; [nan, nan] when none is left. Deterministic in
    ``seed``."""
    if groups < 1:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, groups, size=(resamples, groups))
    values = np.array([statistic(row) for row in draws], dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return [math.nan, math.nan]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]
