"""Sweep mode: the methods replayed offline on one pool of N scored samples per question.

A pool (``programs/pool.py``) holds N samples in draw order, each with its self-evaluation scores
at several token budgets and at its end (plus, when asked, a reward-model score and a zero-shot
judge score of the final response). From it every method is simulated without new generation:

- best-of-k (k <= N) by a scorer: the first k samples, argmax of the scorer;
- majority vote and pass@k oracle over the first k samples;
- adaptive sampling at a threshold: samples in draw order in batches ``batch_sizes(N)``, stop once
  the best final score reaches the threshold (``ThresholdStop``: 1.0 never stops), argmax;
- early pruning at budget b keeping k: rank all samples by their score at b, finish the top k;
  samples finished by b are complete and stay eligible; the best eligible final score wins;
- adaptive + pruning: adaptive rounds, each pruned to ``round_keep`` of its samples.

Ties go to the earliest-drawn sample, as in the programs. Costs are counted from the token counts:
samples, batches, generated tokens (a pruned sample costs only b), evaluations, critical-path
tokens and FLOPs estimated with ``request_flops`` per modelled request (prompt prefilled once,
evaluations hitting the prefix cache), plus the reward model's reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sgl_adaptive.costs import ModelShape, request_flops
from sgl_adaptive.schedules import ThresholdStop, batch_sizes

SCORERS = {"best-of-n": "self", "rm-best-of-n": "rm", "judge-best-of-n": "judge"}
"""Best-of-N methods and the scorer each selects by."""


@dataclass(frozen=True)
class PoolSample:
    """One sample of a pool, as the simulations need it."""

    tokens: int
    finished: bool
    """Stopped by the model (not by the token limit)."""
    scores: tuple[tuple[int, float], ...]
    """Self-evaluations as (tokens generated when evaluated, score), in order; the last is final."""
    quality: float
    """1.0 / 0.0 for a verifiable task, the judge's value for general prompts."""
    answer: str | None = None
    """The extracted final answer (majority vote)."""
    temperature: float = 0.0
    rm: float | None = None
    rm_tokens: int = 0
    rm_flops: float = 0.0
    judge: float | None = None
    judge_prefill: int = 0
    """New prompt tokens of the zero-shot judge's evaluation request."""

    @property
    def final_score(self) -> float | None:
        return self.scores[-1][1] if self.scores else None

    def done_by(self, budget: int) -> bool:
        """Complete after ``budget`` tokens: the model stopped it at or before the budget."""
        return self.finished and self.tokens <= budget

    def score_at(self, budget: int) -> float | None:
        """The score a pruning point at ``budget`` sees: the evaluation at the budget, or the final one
        of a sample that finished before it."""
        if self.done_by(budget):
            return self.final_score
        for tokens, score in self.scores:
            if tokens == budget:
                return score
        raise ValueError(f"the pool has no self-evaluation at {budget} tokens")


@dataclass(frozen=True)
class Pool:
    samples: tuple[PoolSample, ...]
    prompt_tokens: int = 0
    """Prompt tokens of a sample request (chat template and assistant prefix included)."""
    eval_tokens: int = 0
    """New prompt tokens of one self-evaluation request (the evaluation turn)."""
    shape: ModelShape | None = None

    @property
    def n(self) -> int:
        return len(self.samples)


@dataclass
class Outcome:
    """What a simulated method picks and what it would have spent."""

    chosen: int
    quality: float
    score: float | None
    costs: dict[str, Any]
    candidates: list[int] = field(default_factory=list)
    """The samples the method drew, in draw order."""


class Tally:
    """Models the requests a method would send, and sums them into the result lines' cost fields."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.requests: list[tuple[int, int, int]] = []
        self.samples = self.batches = self.critical = 0
        self.generated = self.self_evals = self.eval_prefill = 0
        self.rm_tokens = 0
        self.rm_flops = 0.0
        self._prompt_cached = False

    def sample(self, completion: int, start: int = 0) -> None:
        """A sample request decoding ``completion`` tokens after ``start`` tokens already generated."""
        p = self.pool.prompt_tokens
        if start == 0:
            self.requests.append((p, p if self._prompt_cached else 0, completion))
            self._prompt_cached = True
        else:  # a continuation feeds the last token of the previous part
            self.requests.append((p + start, p + start - 1, completion))
        self.generated += completion

    def evaluate(self, tokens: int, new_tokens: int | None = None) -> None:
        """An evaluation turn after ``tokens`` generated tokens (the prompt and response are cached)."""
        new = self.pool.eval_tokens if new_tokens is None else new_tokens
        p = self.pool.prompt_tokens
        # the sample's last token is fed with the turn (it was never fed back): part of ``new``
        self.requests.append((p + tokens - 1 + new, p + tokens - 1, 1))
        self.self_evals += 1
        self.eval_prefill += new

    def reward(self, smp: PoolSample) -> None:
        self.rm_tokens += smp.rm_tokens
        self.rm_flops += smp.rm_flops

    def costs(self) -> dict[str, Any]:
        shape = self.pool.shape
        flops = None
        if shape is not None:
            flops = sum(request_flops(shape, p, c, n) for p, c, n in self.requests) + self.rm_flops
        return {
            "samples": self.samples,
            "batches": self.batches,
            "generated_tokens": self.generated,
            "prefill_tokens": sum(p - c for p, c, _ in self.requests),
            "cached_tokens": sum(c for _, c, _ in self.requests),
            "self_evals": self.self_evals,
            "eval_prefill_tokens": self.eval_prefill,
            "critical_path_tokens": self.critical,
            "flops": flops,
            "wall_s": None,
            "rm_tokens": self.rm_tokens,
            "rm_flops": self.rm_flops,
            "estimated": True,
        }


def argmax(indices: Iterable[int], values: Sequence[float | None]) -> int:
    """Index of the highest value; ties to the earliest; None values lose; the first index if all None."""
    indices = list(indices)
    scored = [i for i in indices if values[i] is not None]
    if not scored:
        return indices[0]
    return max(scored, key=lambda i: (values[i], -i))


def _outcome(pool: Pool, chosen: int, tally: Tally, drawn: list[int], score: float | None = None) -> Outcome:
    smp = pool.samples[chosen]
    return Outcome(chosen, smp.quality, score, tally.costs(), drawn)


def _draw_all(pool: Pool, tally: Tally, indices: list[int]) -> None:
    """One batch of samples run to their end."""
    for i in indices:
        tally.sample(pool.samples[i].tokens)
    tally.samples += len(indices)
    tally.batches += 1
    tally.critical += max(pool.samples[i].tokens for i in indices)


def _check_k(pool: Pool, k: int) -> list[int]:
    if not 1 <= k <= pool.n:
        raise ValueError(f"k must be within 1..{pool.n} (got {k})")
    return list(range(k))


def greedy(pool: Pool) -> Outcome:
    """The first sample (greedy when the pool is annealed: its temperature is 0)."""
    tally = Tally(pool)
    _draw_all(pool, tally, [0])
    return _outcome(pool, 0, tally, [0])


def best_of(pool: Pool, k: int, scorer: str = "self") -> Outcome:
    """Best-of-k over the first k samples by ``self`` (final self-evaluation), ``rm`` or ``judge``."""
    drawn = _check_k(pool, k)
    tally = Tally(pool)
    _draw_all(pool, tally, drawn)
    samples = pool.samples
    if scorer == "self":
        for i in drawn:
            tally.evaluate(samples[i].tokens)
        values = [s.final_score for s in samples]
    elif scorer == "judge":
        for i in drawn:
            tally.evaluate(samples[i].tokens, samples[i].judge_prefill)
        values = [s.judge for s in samples]
    elif scorer == "rm":
        for i in drawn:
            tally.reward(samples[i])
        values = [s.rm for s in samples]
    else:
        raise ValueError(f"unknown scorer {scorer!r}")
    if any(values[i] is None for i in drawn):
        raise ValueError(f"the pool has no {scorer} scores")
    chosen = argmax(drawn, values)
    return _outcome(pool, chosen, tally, drawn, values[chosen])


def majority(pool: Pool, k: int) -> Outcome:
    """The most frequent final answer among the first k samples (ties: the answer seen first)."""
    drawn = _check_k(pool, k)
    tally = Tally(pool)
    _draw_all(pool, tally, drawn)
    answers = [pool.samples[i].answer for i in drawn]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return _outcome(pool, 0, tally, drawn)
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)
    return _outcome(pool, answers.index(winner), tally, drawn)


def oracle(pool: Pool, k: int) -> Outcome:
    """pass@k: the best quality among the first k samples (an upper bound, not a method)."""
    drawn = _check_k(pool, k)
    tally = Tally(pool)
    _draw_all(pool, tally, drawn)
    chosen = argmax(drawn, [s.quality for s in pool.samples])
    return _outcome(pool, chosen, tally, drawn)


def adaptive(pool: Pool, threshold: float) -> Outcome:
    """Adaptive sampling: batches 1, 1, 2, 4, ... in draw order until the best final score >= threshold."""
    stop = ThresholdStop(threshold)
    tally = Tally(pool)
    finals = [s.final_score for s in pool.samples]
    drawn: list[int] = []
    for size in batch_sizes(pool.n):
        batch = list(range(len(drawn), len(drawn) + size))
        _draw_all(pool, tally, batch)
        for i in batch:
            tally.evaluate(pool.samples[i].tokens)
        drawn += batch
        if stop.should_stop(max((finals[i] for i in drawn if finals[i] is not None), default=None)):
            break
    chosen = argmax(drawn, finals)
    return _outcome(pool, chosen, tally, drawn, finals[chosen])


def _prune_round(pool: Pool, tally: Tally, indices: list[int], budget: int, keep: int) -> list[int]:
    """Generate ``indices`` to ``budget``, score, finish the top ``keep``; return the eligible samples
    (those finished by the budget, and the continued ones)."""
    samples = pool.samples
    first = {i: min(samples[i].tokens, budget) for i in indices}
    for i in indices:
        tally.sample(first[i])
        tally.evaluate(first[i])
    tally.samples += len(indices)
    tally.batches += 1
    tally.critical += max(first.values())
    at_budget = {i: samples[i].score_at(budget) for i in indices}
    ranked = sorted(indices, key=lambda i: (-(at_budget[i] if at_budget[i] is not None else -1.0), i))
    continued = [i for i in sorted(ranked[:keep]) if not samples[i].done_by(budget)]
    for i in continued:
        tally.sample(max(samples[i].tokens - budget, 0), start=budget)
        tally.evaluate(samples[i].tokens)
    if continued:
        tally.critical += max(samples[i].tokens - budget for i in continued)
    return sorted({i for i in indices if samples[i].done_by(budget)} | set(continued))


def prune(pool: Pool, budget: int, keep: int) -> Outcome:
    """Early pruning of all N samples at ``budget`` tokens, keeping ``keep``."""
    if not 1 <= keep <= pool.n:
        raise ValueError(f"keep must be within 1..{pool.n} (got {keep})")
    tally = Tally(pool)
    drawn = list(range(pool.n))
    eligible = _prune_round(pool, tally, drawn, budget, keep)
    finals = [s.final_score for s in pool.samples]
    chosen = argmax(eligible, finals)
    return _outcome(pool, chosen, tally, drawn, finals[chosen])


def adaptive_prune(pool: Pool, threshold: float, budget: int, keep: int) -> Outcome:
    """Adaptive rounds, each pruned at ``budget`` to ``round_keep(size, keep, N)`` samples."""
    from sgl_adaptive.programs.adaptive_pruning import round_keep

    stop = ThresholdStop(threshold)
    tally = Tally(pool)
    finals = [s.final_score for s in pool.samples]
    drawn: list[int] = []
    eligible: list[int] = []
    for size in batch_sizes(pool.n):
        batch = list(range(len(drawn), len(drawn) + size))
        eligible += _prune_round(pool, tally, batch, budget, round_keep(size, keep, pool.n))
        drawn += batch
        if stop.should_stop(max((finals[i] for i in eligible if finals[i] is not None), default=None)):
            break
    chosen = argmax(eligible, finals)
    return _outcome(pool, chosen, tally, drawn, finals[chosen])


def simulate(pool: Pool, method: str, config: dict[str, Any]) -> Outcome:
    """Dispatch one (method, config) of the sweep grid."""
    if method == "greedy":
        return greedy(pool)
    if method in SCORERS:
        return best_of(pool, config["n"], SCORERS[method])
    if method == "majority":
        return majority(pool, config["n"])
    if method == "oracle":
        return oracle(pool, config["n"])
    if method == "adaptive":
        return adaptive(pool, config["threshold"])
    if method == "prune":
        return prune(pool, config["prune_at"], config["keep"])
    if method == "adaptive-prune":
        return adaptive_prune(pool, config["threshold"], config["prune_at"], config["keep"])
    raise ValueError(f"unknown method {method!r}")


def sample_counts(n: int) -> list[int]:
    """The best-of-k sizes of a sweep: powers of two below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def sweep_grid(
    methods: Sequence[str],
    n: int,
    thresholds: Sequence[float],
    budgets: Sequence[int],
    keeps: Sequence[int],
    combined_budget: int,
    combined_keep: int,
) -> list[tuple[str, dict[str, Any]]]:
    """Every (method, config) a sweep computes: best-of-k/majority/oracle for k in ``sample_counts``,
    adaptive at each threshold, pruning at each budget x keep, adaptive + pruning at each threshold
    with one (budget, keep)."""
    grid: list[tuple[str, dict[str, Any]]] = []
    for method in methods:
        if method == "greedy":
            grid.append((method, {}))
        elif method in SCORERS or method in ("majority", "oracle"):
            grid += [(method, {"n": k}) for k in sample_counts(n)]
        elif method == "adaptive":
            grid += [(method, {"n": n, "threshold": t}) for t in thresholds]
        elif method == "prune":
            grid += [(method, {"n": n, "prune_at": b, "keep": k}) for b in budgets for k in keeps]
        elif method == "adaptive-prune":
            grid += [
                (method, {"n": n, "threshold": t, "prune_at": combined_budget, "keep": combined_keep})
                for t in thresholds
            ]
    return grid


def percent_of_max(value: float, base: float, top: float) -> float | None:
    """The paper's "percent of maximum improvement": (value - base) / (top - base) x 100, where base is
    greedy (or one sample) and top is Best-of-N by the same scorer; None unless top beats base (there
    is no improvement to take a percentage of)."""
    if top - base < 1e-12:
        return None
    return 100.0 * (value - base) / (top - base)
