"""AUROC and Brier score of self-evaluation scores against "No" labels (1 = the response is kept)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting one half
    (Mann-Whitney with mid-ranks). nan when one class is absent."""
    if len(scores) != len(positives):
        raise ValueError("scores and labels differ in length")
    n_pos = sum(1 for p in positives if p)
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mid = (i + j) / 2 + 1  # 1-based mid-rank of the tied run
        for k in range(i, j + 1):
            ranks[order[k]] = mid
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positives, strict=True) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def brier(scores: Sequence[float], targets: Sequence[float]) -> float:
    """Mean squared error of the scores against 0/1 (or soft) targets; nan when empty."""
    if len(scores) != len(targets):
        raise ValueError("scores and targets differ in length")
    if not scores:
        return math.nan
    return sum((s - t) ** 2 for s, t in zip(scores, targets, strict=True)) / len(scores)
