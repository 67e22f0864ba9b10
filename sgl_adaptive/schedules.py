"""Schedules of adaptive sampling: batch sizes and temperature annealing (the stop rules are in ``rules.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sgl_adaptive.rules import ThresholdStop

__all__ = ["Annealing", "ThresholdStop", "batch_sizes"]


def batch_sizes(budget: int) -> list[int]:
    """Sequential batch sizes 1, 1, 2, 4, 8, ... (each doubling the samples so far), capped at the budget.

    For a budget of 16 this is the paper's 1, 1, 2, 4, 8: latency grows with log2 of the budget.
    """
    if budget < 1:
        raise ValueError("the sample budget must be at least 1")
    sizes: list[int] = []
    drawn = 0
    while drawn < budget:
        size = min(max(drawn, 1), budget - drawn)
        sizes.append(size)
        drawn += size
    return sizes


@dataclass(frozen=True)
class Annealing:
    """Temperature as a function of how many samples were already drawn (k).

    ``paper``: T(k) = T * (1 - 2**-k): the first sample is greedy, then 0.5T, 0.75T, ...
    (significant annealing only on the first few samples). ``none``: T(k) = T.
    """

    temperature: float
    kind: Literal["paper", "none"] = "paper"

    def __call__(self, k: int) -> float:
        if self.kind == "none":
            return self.temperature
        return self.temperature * (1.0 - 2.0 ** (-k))
