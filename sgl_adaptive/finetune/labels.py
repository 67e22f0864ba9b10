"""Pairwise labels: is a response beaten by another sample of the same prompt?

Sample ``j`` beats sample ``i`` when ``r_j - r_i > margin`` (the tie margin relaxes near-equal rewards,
as the paper does). The target is "No" (I would not do better by starting over) when no other sample
beats the response, "Yes" otherwise; the counts give the soft target P(No) = (wins + ties) / (K - 1).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

KEEP_LABEL = "No"
RETRY_LABEL = "Yes"
VERIFIER_TIE_MARGIN = 0.5
"""Default margin for a 0/1 verifier: any value in (0, 1) gives the same labels."""
RM_MARGIN_STD_FRACTION = 0.1
"""Default margin for a reward model: this fraction of the standard deviation of all rewards."""


@dataclass(frozen=True)
class PairwiseLabel:
    """One response's outcome against the other samples of its prompt."""

    wins: int
    ties: int
    losses: int

    @property
    def label(self) -> str:
        """ "No" on a win or tie against every other sample, "Yes" when any other sample is better."""
        return KEEP_LABEL if self.losses == 0 else RETRY_LABEL

    @property
    def soft_no(self) -> float:
        """Empirical P(win or tie) against one other sample: the soft target for "No"."""
        total = self.wins + self.ties + self.losses
        return (self.wins + self.ties) / total if total else 1.0


def pairwise_labels(rewards: Sequence[float], margin: float) -> list[PairwiseLabel]:
    """Label each reward against all the others of the same prompt (needs at least two)."""
    if len(rewards) < 2:
        raise ValueError("pairwise labels need at least two samples per prompt")
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"the tie margin must be finite and >= 0 (got {margin})")
    out = []
    for i, r_i in enumerate(rewards):
        wins = ties = losses = 0
        for j, r_j in enumerate(rewards):
            if i == j:
                continue
            if r_j - r_i > margin:
                losses += 1
            elif r_i - r_j > margin:
                wins += 1
            else:
                ties += 1
        out.append(PairwiseLabel(wins, ties, losses))
    return out


def default_tie_margin(rewards: Sequence[float], verifier: bool) -> float:
    """The margin used when none is given: 0.5 for a 0/1 verifier, else 0.1 x the std of all rewards."""
    if verifier:
        return VERIFIER_TIE_MARGIN
    return RM_MARGIN_STD_FRACTION * statistics.pstdev(rewards) if len(rewards) > 1 else 0.0
