"""The decision rules of every method, each written once: the programs (``programs/``) and the offline
sweep (``bench/sweep.py``) both call them.

A rule sees plain values: sample indices in draw order, and per-sample sequences (scores, extracted
answers) indexed by sample index. Ties always go to the earliest-drawn sample (under annealing the
lowest-temperature one). The schedules (batch sizes, temperature annealing) are in ``schedules.py``.

Selectors (which complete sample is the answer):

- ``argmax``: the highest self-evaluation score (the paper's Best-of-N).
- ``majority``: the most frequent extracted final answer (self-consistency, Wang et al. 2023,
  arXiv:2203.11171); ties go to the answer drawn first; the earliest sample holding it is returned.
- ``weighted-majority``: each sample votes for its answer with weight w_i = exp(s_i / tau) / sum_j
  exp(s_j / tau) (softmax of the scores s at temperature tau = ``vote_temperature``; a missing score
  counts as 0); the answer with the largest summed weight wins, ties to the answer drawn first
  (verifier-weighted voting as in DiVeRSe, Li et al. 2023, arXiv:2206.02336).
  tau -> 0 approaches argmax, large tau approaches majority.

Both voting selectors fall back to argmax when no sample has an extracted answer.

Pruning keeps the ``keep`` samples best scored at the pruning point (``prune_rank``), or, as the
paper's ablation, ``keep`` samples drawn at random (``random_rank``; no score is read).

Stop rules (adaptive sampling, checked after each round on the complete samples drawn so far):

- ``threshold``: the best score reaches ``threshold`` (1.0 never stops; the paper's rule).
- ``beta``: Adaptive-Consistency's Beta stopping criterion (Aggarwal et al. 2023, "Let's Sample Step
  by Step", arXiv:2305.11860): with v1 and v2 the counts of the two most frequent answers, stop when
  P(p1 > p2) > ``stop_confidence``, where p1 / (p1 + p2) ~ Beta(v1 + 1, v2 + 1); that probability is
  1 - I_0.5(v1 + 1, v2 + 1) = P(Binomial(v1 + v2 + 1, 1/2) <= v1).
- ``esc``: Early-Stopping Self-Consistency (Li et al. 2024, "Escape Sky-high Cost", arXiv:2401.10480):
  stop when the last ``stop_window`` complete samples all hold the same extracted answer (a window of
  zero answer entropy). ESC draws fixed windows; here the window slides over the doubling rounds.
- ``deepconf``: DeepConf-online's warm-up threshold (Fu et al. 2025, "Deep Think with Confidence",
  arXiv:2508.15260), on the samples' scores (any scorer): the first ``warmup`` scored complete
  samples are the warm-up; the threshold is the ``percentile``-th percentile of their scores (linear
  interpolation, as ``numpy.percentile``); stop once a later complete sample's score reaches it. The
  paper's rule reads a token-level confidence (the lowest sliding-window group confidence) and, after
  the warm-up, cuts each running trace whose confidence falls below the threshold (and stops by vote
  consensus); here the score is one number per complete sample and the threshold decides when to stop
  drawing.

Budget allocation across a batch of prompts (``allocate``; ``sgl-adaptive batch``): each round the
prompts whose samples so far are least sure get the next samples, one each:

- ``score``: the lowest best self-evaluation score first (no score counts as lowest).
- ``agreement``: the lowest Adaptive-Consistency confidence of the leading answer first
  (``majority_confidence`` of the two largest answer counts: 1 sample 0.75, 2 agreeing 0.875,
  a 1-1 split 0.5).
- ``even``: the fewest samples first: the budget split evenly (the baseline).

Ties go to the prompt with fewer samples, then to the earlier prompt.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

Scores: TypeAlias = Sequence[float | None] | Mapping[int, float | None]
"""Scores by sample index (a list over all samples, or a dict over some)."""
Answers: TypeAlias = Sequence[str | None] | Mapping[int, str | None]
"""Extracted final answers by sample index (None: no answer, or not complete)."""

SELECTORS: tuple[str, ...] = ("argmax", "majority", "weighted-majority")
STOP_RULES: tuple[str, ...] = ("threshold", "beta", "esc", "deepconf")
PRUNE_BY: tuple[str, ...] = ("score", "random")
ALLOCATIONS: tuple[str, ...] = ("score", "agreement", "even")


def argmax(indices: Iterable[int], values: Scores) -> int:
    """The index of the highest value; ties to the earliest; None loses; the first index if all are None."""
    indices = list(indices)
    scored = [i for i in indices if values[i] is not None]
    if not scored:
        return indices[0]
    return max(scored, key=lambda i: (values[i], -i))


def prune_rank(indices: Iterable[int], scores: Scores, keep: int) -> list[int]:
    """The ``keep`` best-scored of ``indices`` (ties to the earliest, a missing score ranks as -1), in
    draw order: the samples early pruning continues."""
    ranked = sorted(indices, key=lambda i: (-(scores[i] if scores[i] is not None else -1.0), i))
    return sorted(ranked[:keep])


def random_rank(indices: Iterable[int], keep: int, seed: int) -> list[int]:
    """``keep`` of ``indices`` drawn uniformly at random, in draw order: the random-pruning ablation. The
    draw is seeded by ``seed`` and the indices, so the programs and the sweep keep the same samples."""
    indices = list(indices)
    rng = random.Random(f"{seed}:{indices}")
    return sorted(rng.sample(indices, min(keep, len(indices))))


def pruned_keep(
    indices: Iterable[int], scores: Scores, keep: int, by: str = "score", seed: int = 0
) -> list[int]:
    """The samples early pruning keeps: ranked by score (``prune_rank``) or at random (``random_rank``)."""
    check_name("pruning rule", by, PRUNE_BY)
    return prune_rank(indices, scores, keep) if by == "score" else random_rank(indices, keep, seed)


def round_keep(size: int, keep: int, n: int) -> int:
    """Samples continued in a pruned round of ``size``: the overall keep fraction ``keep / n``, at least one."""
    return max(1, math.ceil(size * keep / n))


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> str | None:
    """The answer with the largest total weight (1 per sample without ``weights``); ties to the answer
    that appears first; None answers do not vote; None if no sample has an answer."""
    totals: dict[str, float] = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + (1.0 if weights is None else weights[i])
    if not totals:
        return None
    top = max(totals.values())
    return next(a for a in totals if totals[a] == top)  # dicts keep first-appearance order


def score_weights(scores: Sequence[float | None], temperature: float) -> list[float]:
    """Softmax of the scores at ``temperature`` (a missing score counts as 0)."""
    values = [(s if s is not None else 0.0) / temperature for s in scores]
    top = max(values, default=0.0)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


@dataclass(frozen=True)
class Selector:
    """Picks the answer among complete samples (see the module docstring for each kind)."""

    kind: str = "argmax"
    vote_temperature: float = 0.1

    def __post_init__(self) -> None:
        check_name("selector", self.kind, SELECTORS)
        if self.vote_temperature <= 0:
            raise ValueError(f"the vote temperature must be > 0 (got {self.vote_temperature})")

    @property
    def needs_scores(self) -> bool:
        return self.kind != "majority"

    def pick(self, indices: Iterable[int], scores: Scores, answers: Answers) -> int:
        indices = list(indices)
        if self.kind == "argmax":
            return argmax(indices, scores)
        weights = None
        if self.kind == "weighted-majority":
            weights = score_weights([scores[i] for i in indices], self.vote_temperature)
        winner = vote([answers[i] for i in indices], weights)
        if winner is None:
            return argmax(indices, scores)
        return next(i for i in indices if answers[i] == winner)


def majority_confidence(top: int, second: int) -> float:
    """Adaptive-Consistency's P(p1 > p2) under p1 / (p1 + p2) ~ Beta(top + 1, second + 1), exactly:
    P(Binomial(top + second + 1, 1/2) <= top)."""
    trials = top + second + 1
    return sum(math.comb(trials, j) for j in range(top + 1)) / 2**trials


@dataclass(frozen=True)
class StopRule:
    """When adaptive sampling stops drawing (see the module docstring for each kind)."""

    kind: str = "threshold"
    threshold: float = 0.98
    confidence: float = 0.95
    window: int = 4
    warmup: int = 4
    percentile: float = 90.0

    def __post_init__(self) -> None:
        check_name("stop rule", self.kind, STOP_RULES)

    @property
    def needs_scores(self) -> bool:
        return self.kind in ("threshold", "deepconf")

    def should_stop(self, complete: Iterable[int], scores: Scores, answers: Answers) -> bool:
        """Decide on the ``complete`` samples drawn so far (indices in draw order)."""
        complete = list(complete)
        if self.kind == "threshold":
            present = [scores[i] for i in complete if scores[i] is not None]
            return ThresholdStop(self.threshold).should_stop(max(present, default=None))
        if self.kind == "beta":
            counts = sorted(_counts(answers[i] for i in complete).values(), reverse=True)
            if not counts:
                return False
            return majority_confidence(counts[0], counts[1] if len(counts) > 1 else 0) > self.confidence
        if self.kind == "deepconf":
            return deepconf_should_stop([scores[i] for i in complete], self.warmup, self.percentile)
        last = [answers[i] for i in complete[-self.window :]]
        return len(last) >= self.window and last[0] is not None and all(a == last[0] for a in last)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation between the closest ranks
    (``numpy.percentile``'s default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("the percentile of no values")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def deepconf_should_stop(scores: Sequence[float | None], warmup: int, q: float) -> bool:
    """DeepConf-online's warm-up threshold on complete samples' ``scores`` in draw order: the first
    ``warmup`` present scores set the threshold (their ``q``-th percentile); stop once a later score
    reaches it. Never stops during the warm-up."""
    present = [s for s in scores if s is not None]
    if len(present) <= warmup:
        return False
    bar = percentile(present[:warmup], q)
    return any(s >= bar for s in present[warmup:])


def allocation_need(kind: str, scores: Sequence[float | None], answers: Sequence[str | None]) -> float:
    """How sure one prompt's samples so far are under allocation ``kind`` (lower: the next sample helps
    more): the best score (``score``; -1 without one), the leading answer's ``majority_confidence``
    (``agreement``) or the number of samples (``even``)."""
    check_name("allocation", kind, ALLOCATIONS)
    if kind == "score":
        return max((s for s in scores if s is not None), default=-1.0)
    if kind == "agreement":
        counts = sorted(_counts(answers).values(), reverse=True) + [0, 0]
        return majority_confidence(counts[0], counts[1])
    return float(len(scores))


def allocate(
    kind: str,
    prompts: Sequence[tuple[Sequence[float | None], Sequence[str | None]]],
    slots: int,
    eligible: Iterable[int] | None = None,
) -> list[int]:
    """The prompts (indices into ``prompts``, each ``(scores, answers)`` of its samples so far) that get
    the next sample each, at most ``slots`` of them, neediest first (``allocation_need``; ties to fewer
    samples, then to the earlier prompt); only the ``eligible`` ones (default: all) are considered."""
    check_name("allocation", kind, ALLOCATIONS)
    candidates = range(len(prompts)) if eligible is None else eligible
    ranked = sorted(
        candidates,
        key=lambda p: (allocation_need(kind, *prompts[p]), len(prompts[p][0]), p),
    )
    return ranked[: max(slots, 0)]


@dataclass(frozen=True)
class ThresholdStop:
    """Stop drawing once the best self-evaluation score reaches the threshold.

    A threshold of 1.0 never stops early (the paper's convention: the full budget is drawn).
    """

    threshold: float

    def should_stop(self, best_score: float | None) -> bool:
        if best_score is None or self.threshold >= 1.0:
            return False
        return best_score >= self.threshold


def _counts(answers: Iterable[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    return counts


def check_name(what: str, name: str, valid: Sequence[str]) -> None:
    """A one-line error naming the valid choices (a ``ValueError``; ``MethodConfig`` raises a ``UserError``)."""
    if name not in valid:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(valid)}")
