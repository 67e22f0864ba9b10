"""Sweep mode: the methods replayed offline on one pool of N scored samples per question.

A pool (``programs/pool.py``) holds N samples in draw order, each with its self-evaluation scores
at several token budgets and at its end (plus, when asked, a reward-model score and a zero-shot
judge score of the final response, and the training-free scores at the same points,
``PoolSample.free_scores``). From it every method is simulated without new generation:

- best-of-k (k <= N) by a scorer: the first k samples, picked by the selector (argmax of the scorer);
- majority vote and pass@k oracle over the first k samples;
- adaptive sampling: samples in draw order in batches ``batch_sizes(N)`` until the stop rule holds
  (by default the best final score reaches the threshold; 1.0 never stops), then the selector picks;
- early pruning at budget b keeping k: rank all samples by their score at b, finish the top k;
  samples finished by b are complete and stay eligible; the selector picks among the eligible;
- adaptive + pruning: adaptive rounds, each pruned to ``round_keep`` of its samples;
- budget-matched (sweep only): best-of-m over the first m samples, m the most whole samples that fit in
  the generated tokens early pruning at the same budget and keep spent on the question.

Every decision (batch schedule, stop rule, pruning rank, selection, vote) is the programs' own, from
``sgl_adaptive.rules`` and ``sgl_adaptive.schedules``; ties go to the earliest-drawn sample. Costs are
the library's ``Costs``, summed by the programs' ``CostMeter`` from modelled requests: samples, batches,
generated tokens (a pruned sample costs only b), evaluations, critical-path tokens and FLOPs estimated
with ``request_flops`` (prompt prefilled once, evaluations hitting the prefix cache); the reward
model's reads are the meter's own (``Costs.rm_reads``, ``rm_tokens``, ``rm_flops``, in ``flops``). A configuration's ``scorer``
(``scorers.py``; default self-eval) chooses the scores every rule reads (``Pool.scored_by``); a
training-free scorer's scores come with the samples, so no evaluation is counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sgl_adaptive.costs import CostMeter, Costs, ModelShape, RequestKind
from sgl_adaptive.rules import Selector, StopRule, argmax, pruned_keep, round_keep
from sgl_adaptive.schedules import batch_sizes
from sgl_adaptive.scorers import SCORERS as SCORER_NAMES
from sgl_adaptive.scorers import TRAINING_FREE

from .methods import VARIANTS, base_method, runs_in

ARGMAX = Selector("argmax")

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
    free_scores: Mapping[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    """Training-free scorer (``confidence``, ``self-certainty``) -> its scores at the points of ``scores``."""

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
    scorer: str = "self-eval"
    """What ``PoolSample.scores`` hold: self-evaluations (each one a request) or a training-free scorer's
    scores (no request)."""

    @property
    def n(self) -> int:
        return len(self.samples)

    def scored_by(self, scorer: str) -> Pool:
        """This pool with every sample's ``scores`` those of ``scorer`` (from ``free_scores`` for a
        training-free scorer, which the rules then read at no evaluation cost)."""
        if scorer not in SCORER_NAMES:
            raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORER_NAMES)}")
        if scorer == self.scorer:
            return self
        if scorer not in TRAINING_FREE or any(scorer not in s.free_scores for s in self.samples):
            raise ValueError(f"the pool has no {scorer} scores")
        samples = tuple(replace(s, scores=s.free_scores[scorer]) for s in self.samples)
        return replace(self, samples=samples, scorer=scorer)


@dataclass
class Outcome:
    """What a simulated method picks and what it would have spent."""

    chosen: int
    quality: float
    score: float | None
    costs: Costs
    """Estimated from token counts (``wall_s`` 0: not measured); the reward model's reads are in ``rm_reads``,
    ``rm_tokens`` and ``rm_flops`` and, as the programs count them, in ``flops``."""
    candidates: list[int] = field(default_factory=list)
    """The samples the method drew, in draw order."""
    matched_tokens: int | None = None
    """``budget_matched``: the generated tokens of the pruning it is matched to."""


class Tally:
    """Models the requests a method would send, and the reward model's reads, in a ``CostMeter``: the
    programs' own cost meter."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.meter = CostMeter()
        self._prompt_cached = False

    def batch(self, size: int, longest: int) -> None:
        """A sequential round of ``size`` samples whose longest generation is ``longest`` tokens."""
        self.meter.start_round(size)
        self.meter.add_critical_path(longest)

    def sample(self, completion: int, start: int = 0) -> None:
        """A sample request decoding ``completion`` tokens after ``start`` tokens already generated."""
        p = self.pool.prompt_tokens
        if start == 0:
            self._record("sample", p, p if self._prompt_cached else 0, completion)
            self._prompt_cached = True
        else:  # a continuation feeds the last token of the previous part
            self._record("sample", p + start, p + start - 1, completion)

    def evaluate(self, tokens: int, new_tokens: int | None = None) -> None:
        """An evaluation turn after ``tokens`` generated tokens (the prompt and response are cached); no
        self-evaluation when the pool's scores are training-free (they come with the sample)."""
        if new_tokens is None and self.pool.scorer in TRAINING_FREE:
            return
        new = self.pool.eval_tokens if new_tokens is None else new_tokens
        p = self.pool.prompt_tokens
        # the sample's last token is fed with the turn (it was never fed back): part of ``new``
        self._record("eval", p + tokens - 1 + new, p + tokens - 1, 1)

    def reward(self, smp: PoolSample) -> None:
        """The reward model reads the prompt and the sample in full."""
        self.meter.record_rm(smp.rm_tokens, smp.rm_flops)

    def _record(self, kind: RequestKind, prompt: int, cached: int, completion: int) -> None:
        meta = {"prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion}
        self.meter.record(kind, meta)

    def outcome(self, chosen: int, drawn: list[int], score: float | None = None) -> Outcome:
        costs = self.meter.totals(self.pool.shape)
        quality = self.pool.samples[chosen].quality
        return Outcome(chosen, quality, score, costs, drawn)


def _draw_all(pool: Pool, tally: Tally, indices: list[int]) -> None:
    """One batch of samples run to their end."""
    for i in indices:
        tally.sample(pool.samples[i].tokens)
    tally.batch(len(indices), max(pool.samples[i].tokens for i in indices))


def _check_k(pool: Pool, k: int) -> list[int]:
    if not 1 <= k <= pool.n:
        raise ValueError(f"k must be within 1..{pool.n} (got {k})")
    return list(range(k))


def _finals(pool: Pool) -> list[float | None]:
    return [s.final_score for s in pool.samples]


def _answers(pool: Pool) -> list[str | None]:
    return [s.answer for s in pool.samples]


def greedy(pool: Pool) -> Outcome:
    """The first sample (greedy when the pool is annealed: its temperature is 0)."""
    tally = Tally(pool)
    _draw_all(pool, tally, [0])
    return tally.outcome(0, [0])


def best_of(pool: Pool, k: int, scorer: str = "self", selector: Selector = ARGMAX) -> Outcome:
    """Best-of-k over the first k samples by ``self`` (final self-evaluation), ``rm`` or ``judge``, picked by
    ``selector`` (argmax of the score, or a vote weighted by it)."""
    drawn = _check_k(pool, k)
    tally = Tally(pool)
    _draw_all(pool, tally, drawn)
    samples = pool.samples
    if not selector.needs_scores:
        return tally.outcome(selector.pick(drawn, [None] * pool.n, _answers(pool)), drawn)
    if scorer == "self":
        for i in drawn:
            tally.evaluate(samples[i].tokens)
        values = _finals(pool)
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
    chosen = selector.pick(drawn, values, _answers(pool))
    return tally.outcome(chosen, drawn, values[chosen])


def majority(pool: Pool, k: int) -> Outcome:
    """The most frequent final answer among the first k samples (ties: the answer seen first); no scores."""
    return best_of(pool, k, selector=Selector("majority"))


def oracle(pool: Pool, k: int) -> Outcome:
    """pass@k: the best quality among the first k samples (an upper bound, not a method)."""
    drawn = _check_k(pool, k)
    tally = Tally(pool)
    _draw_all(pool, tally, drawn)
    return tally.outcome(argmax(drawn, [s.quality for s in pool.samples]), drawn)


def adaptive(
    pool: Pool,
    threshold: float,
    stop: StopRule | None = None,
    selector: Selector = ARGMAX,
    n: int | None = None,
) -> Outcome:
    """Adaptive sampling with budget ``n`` (default: the pool): batches 1, 1, 2, 4, ... in draw order until
    ``stop`` holds (default: the best final score reaches ``threshold``); then ``selector`` picks.
    Samples are self-evaluated only when the stop rule or the selector reads scores."""
    stop = stop or StopRule("threshold", threshold)
    scored = stop.needs_scores or selector.needs_scores
    tally = Tally(pool)
    finals = _finals(pool) if scored else [None] * pool.n
    answers = _answers(pool)
    drawn: list[int] = []
    for size in batch_sizes(n or pool.n):
        batch = list(range(len(drawn), len(drawn) + size))
        _draw_all(pool, tally, batch)
        if scored:
            for i in batch:
                tally.evaluate(pool.samples[i].tokens)
        drawn += batch
        if stop.should_stop(drawn, finals, answers):
            break
    chosen = selector.pick(drawn, finals, answers)
    return tally.outcome(chosen, drawn, finals[chosen])


def _prune_round(
    pool: Pool, tally: Tally, indices: list[int], budget: int, keep: int, by: str = "score", seed: int = 0
) -> list[int]:
    """Generate ``indices`` to ``budget``, score, finish the ``keep`` that ``pruned_keep`` keeps (best
    scored, or random: then only the samples complete by the budget are scored); return the eligible
    samples (those finished by the budget, and the continued ones)."""
    samples = pool.samples
    first = {i: min(samples[i].tokens, budget) for i in indices}
    at_budget: dict[int, float | None] = {}
    for i in indices:
        tally.sample(first[i])
        if by == "score" or samples[i].done_by(budget):
            tally.evaluate(first[i])
            at_budget[i] = samples[i].score_at(budget)
    tally.batch(len(indices), max(first.values()))
    kept = pruned_keep(indices, {i: at_budget.get(i) for i in indices}, keep, by, seed)
    continued = [i for i in kept if not samples[i].done_by(budget)]
    for i in continued:
        tally.sample(max(samples[i].tokens - budget, 0), start=budget)
        tally.evaluate(samples[i].tokens)
    if continued:
        tally.meter.add_critical_path(max(samples[i].tokens - budget for i in continued))
    return sorted({i for i in indices if samples[i].done_by(budget)} | set(continued))


def prune(
    pool: Pool, budget: int, keep: int, selector: Selector = ARGMAX, by: str = "score", seed: int = 0
) -> Outcome:
    """Early pruning of all N samples at ``budget`` tokens, keeping ``keep`` (best scored, or random);
    ``selector`` picks among the complete ones."""
    if not 1 <= keep <= pool.n:
        raise ValueError(f"keep must be within 1..{pool.n} (got {keep})")
    tally = Tally(pool)
    drawn = list(range(pool.n))
    eligible = _prune_round(pool, tally, drawn, budget, keep, by, seed)
    finals = _finals(pool)
    chosen = selector.pick(eligible, finals, _answers(pool))
    return tally.outcome(chosen, drawn, finals[chosen])


def adaptive_prune(
    pool: Pool,
    threshold: float,
    budget: int,
    keep: int,
    stop: StopRule | None = None,
    selector: Selector = ARGMAX,
    by: str = "score",
    seed: int = 0,
) -> Outcome:
    """Adaptive rounds, each pruned at ``budget`` to ``round_keep(size, keep, N)`` samples."""
    stop = stop or StopRule("threshold", threshold)
    tally = Tally(pool)
    finals = _finals(pool)
    answers = _answers(pool)
    drawn: list[int] = []
    eligible: list[int] = []
    for size in batch_sizes(pool.n):
        batch = list(range(len(drawn), len(drawn) + size))
        eligible += _prune_round(pool, tally, batch, budget, round_keep(size, keep, pool.n), by, seed)
        drawn += batch
        if stop.should_stop(eligible, finals, answers):
            break
    chosen = selector.pick(eligible, finals, answers)
    return tally.outcome(chosen, drawn, finals[chosen])


def samples_within(tokens: Sequence[int], budget: int) -> int:
    """How many whole samples, taken in draw order, fit in ``budget`` generated tokens: the largest m
    with tokens[0] + ... + tokens[m - 1] <= budget, stopping at the first that does not fit; at least
    1 (a method must answer), even when the first sample alone exceeds the budget."""
    fitted, spent = 0, 0
    for t in tokens:
        if spent + t > budget:
            break
        fitted, spent = fitted + 1, spent + t
    return max(1, fitted)


def budget_matched(pool: Pool, budget: int, keep: int, selector: Selector = ARGMAX) -> Outcome:
    """The compute-matched control for early pruning (our reading of the paper's "pruning at a fixed
    budget" ablation, without the score): plain sampling given the generated tokens that ``prune(pool, budget, keep)`` spent on
    this question. Whole samples are drawn in pool order until the next would exceed those tokens
    (``samples_within``: at least one), then ``selector`` picks among them by their final scores, as
    best-of-m. No score is read at a pruning point. It answers: does pruning by the score beat simply
    drawing fewer samples for the same tokens? Sweep only: it needs each sample's length in advance."""
    spent = prune(pool, budget, keep).costs.generated_tokens
    out = best_of(pool, samples_within([s.tokens for s in pool.samples], spent), "self", selector)
    return replace(out, matched_tokens=spent)


def rules_of(config: dict[str, Any]) -> tuple[StopRule, Selector]:
    """The stop rule and selector of a sweep configuration (absent keys: the defaults of ``MethodConfig``)."""
    stop = StopRule(
        config.get("stop", "threshold"),
        config.get("threshold", 1.0),
        config.get("stop_confidence", 0.95),
        config.get("stop_window", 4),
        config.get("stop_warmup", 4),
        config.get("stop_percentile", 90.0),
    )
    return stop, Selector(config.get("selector", "argmax"), config.get("vote_temperature", 0.1))


def simulate(pool: Pool, method: str, config: dict[str, Any]) -> Outcome:
    """Dispatch one (method, config) of the sweep grid (a ``VARIANTS`` method: its base method, with the
    rules its configuration names)."""
    stop, selector = rules_of(config)
    pool = pool.scored_by(config.get("scorer", "self-eval"))
    kind = base_method(method)
    by, seed = config.get("prune_by", "score"), config.get("seed", 0)
    if kind == "greedy":
        return greedy(pool)
    if kind in SCORERS:
        return best_of(pool, config["n"], SCORERS[kind], selector)
    if kind == "majority":
        return majority(pool, config["n"])
    if kind == "oracle":
        return oracle(pool, config["n"])
    if kind == "adaptive":
        return adaptive(pool, stop.threshold, stop, selector)
    if kind == "prune":
        return prune(pool, config["prune_at"], config["keep"], selector, by, seed)
    if kind == "adaptive-prune":
        return adaptive_prune(
            pool, stop.threshold, config["prune_at"], config["keep"], stop, selector, by, seed
        )
    if kind == "budget-matched":
        return budget_matched(pool, config["prune_at"], config["keep"], selector)
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
    adaptive at each threshold (once for a stop rule that reads none), pruning at each budget x keep,
    adaptive + pruning at each threshold with one (budget, keep), budget-matched at each pruning budget x
    keep; a ``VARIANTS`` method as its base method with its fields added. Live-only methods
    (``methods.ONLY_MODE``) have no sweep configuration."""
    grid: list[tuple[str, dict[str, Any]]] = []
    for method in methods:
        extra = VARIANTS[method][1] if method in VARIANTS else {}
        kind = base_method(method)
        configs: list[dict[str, Any]] = []
        if not runs_in(method, "sweep"):
            continue
        if kind == "greedy":
            configs.append({})
        elif kind in SCORERS or kind in ("majority", "oracle"):
            configs += [{"n": k} for k in sample_counts(n)]
        elif kind == "adaptive" and extra.get("stop", "threshold") != "threshold":
            configs.append({"n": n})
        elif kind == "adaptive":
            configs += [{"n": n, "threshold": t} for t in thresholds]
        elif kind in ("prune", "budget-matched"):
            configs += [{"n": n, "prune_at": b, "keep": k} for b in budgets for k in keeps]
        elif kind == "adaptive-prune":
            configs += [
                {"n": n, "threshold": t, "prune_at": combined_budget, "keep": combined_keep}
                for t in thresholds
            ]
        grid += [(method, {**config, **extra}) for config in configs]
    return grid


def percent_of_max(value: float, base: float, top: float) -> float | None:
    """The paper's "percent of maximum improvement": (value - base) / (top - base) x 100, where base is
    greedy (or one sample) and top is Best-of-N by the same scorer; None unless top beats base (there
    is no improvement to take a percentage of)."""
    if top - base < 1e-12:
        return None
    return 100.0 * (value - base) / (top - base)
