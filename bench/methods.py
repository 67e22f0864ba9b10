"""The benchmarked methods: names, their configurations, and live runs of the library's programs.

``greedy``, ``best-of-n``, ``adaptive``, ``prune`` and ``adaptive-prune`` are ``sgl_adaptive.run``, and so
are the ``VARIANTS`` (those methods with fixed rules, or the paper's ablations).
``judge-best-of-n`` is the best-of-n program with a zero-shot judge as the scorer. ``majority``,
``oracle`` and ``rm-best-of-n`` draw N unscored samples with ``sample_pool(evaluate=False)``; within
one question they share that draw (same program, same seed: the samples and costs of separate
runs), and ``rm-best-of-n`` adds the reward model's reads to the costs.

Most methods run in both modes; ``ONLY_MODE`` names the few that cannot, and why. ``budget-matched``
(the compute-matched control for pruning) exists only in a sweep (``sweep.budget_matched``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.costs import Costs
from sgl_adaptive.result import Result
from sgl_adaptive.rules import Selector, argmax
from sgl_adaptive.selfeval import SelfEvalConfig

from .datasets import Item, Judge, answer_key, grade
from .reward import RewardModel, RewardScores
from .store import config_hash

METHODS: tuple[str, ...] = (
    "greedy",
    "best-of-n",
    "confidence-best-of-n",
    "self-certainty-best-of-n",
    "rm-best-of-n",
    "judge-best-of-n",
    "majority",
    "oracle",
    "weighted-majority",
    "adaptive",
    "adaptive-consistency",
    "esc",
    "deepconf",
    "prune",
    "adaptive-prune",
    "adaptive-no-anneal",
    "best-of-n-anneal",
    "random-prune",
    "budget-matched",
)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "confidence-best-of-n": ("best-of-n", {"scorer": "confidence"}),
    "self-certainty-best-of-n": ("best-of-n", {"scorer": "self-certainty"}),
    "weighted-majority": ("best-of-n", {"selector": "weighted-majority", "vote_temperature": 0.1}),
    "adaptive-consistency": ("adaptive", {"selector": "majority", "stop": "beta", "stop_confidence": 0.95}),
    "esc": ("adaptive", {"selector": "majority", "stop": "esc", "stop_window": 4}),
    "deepconf": ("adaptive", {"stop": "deepconf", "stop_warmup": 4, "stop_percentile": 90.0}),
    "adaptive-no-anneal": ("adaptive", {"anneal": "none"}),
    "best-of-n-anneal": ("best-of-n", {"anneal_best_of_n": True}),
    "random-prune": ("prune", {"prune_by": "random"}),
}
"""Bench methods that are a library method with fixed rules (``sgl_adaptive.rules``), or one of the
paper's ablations (no annealing, annealing on plain Best-of-N, random pruning): the base method and
the fields its configurations add."""
ONLY_MODE: dict[str, tuple[str, str]] = {
    "adaptive-no-anneal": (
        "live",
        "a sweep replays one pool drawn at one temperature schedule; a sweep with --anneal none "
        "gives this ablation's numbers as its adaptive rows",
    ),
    "best-of-n-anneal": (
        "live",
        "a sweep replays one pool drawn at one temperature schedule; under --anneal paper a sweep's "
        "best-of-n rows are already annealed",
    ),
    "budget-matched": (
        "sweep",
        "it fits whole samples into the tokens prune spent on the same question, so it needs prune's "
        "spend and each sample's length before drawing it: only a pool has both",
    ),
}
"""Methods that run in one mode only: method -> (that mode, why)."""
PRUNING = ("prune", "adaptive-prune", "random-prune", "budget-matched")
"""Methods that read --prune-at and --keep (``budget-matched`` to match prune's tokens there)."""
PLAIN_POOL = ("majority", "oracle", "rm-best-of-n")
"""Methods that select among N unscored samples."""


def base_method(method: str) -> str:
    """The library method (``sgl_adaptive.run``) a bench method runs, or the method itself."""
    return VARIANTS[method][0] if method in VARIANTS else method


def runs_in(method: str, mode: str) -> bool:
    """Whether ``method`` has configurations in ``mode`` (live or sweep)."""
    return ONLY_MODE.get(method, (mode, ""))[0] == mode


def mode_refusal(method: str, mode: str) -> str | None:
    """The one-line error for asking ``method`` in a mode it does not run in (None when it does)."""
    if runs_in(method, mode):
        return None
    only, why = ONLY_MODE[method]
    return f"{method} runs in {only} mode only: use --mode {only} ({why})"


def label(method: str, config: dict[str, Any]) -> str:
    """A short human form of a configuration (``n=16 t=0.98``, ``n=16 b=64 k=4``)."""
    parts = []
    for key, short in (("n", "n"), ("threshold", "t"), ("prune_at", "b"), ("keep", "k")):
        if key in config:
            parts.append(
                f"{short}={config[key]:g}" if isinstance(config[key], float) else f"{short}={config[key]}"
            )
    return " ".join(parts)


def live_jobs(
    methods: list[str],
    base: dict[str, Any],
    thresholds: list[float],
    prune_ats: list[int],
    keeps: list[int],
    reward_model: str | None = None,
    judge_prompt: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Every (method, config) of a live run (none for a sweep-only method). ``base`` holds n,
    max_new_tokens, temperature, top_p, anneal, seed; each config keeps only the knobs its method reads
    (so greedy is shared across --n)."""
    common = {k: base[k] for k in ("n", "max_new_tokens", "temperature", "top_p", "seed")}
    jobs: list[tuple[str, dict[str, Any]]] = []
    for method in methods:
        if not runs_in(method, "live"):
            continue
        extra = VARIANTS[method][1] if method in VARIANTS else {}
        kind = base_method(method)
        if kind == "adaptive" and extra.get("stop", "threshold") != "threshold":
            thresholds_read: list[float | None] = [None]  # the stop rule reads no threshold
        else:
            thresholds_read = list(thresholds)
        configs: list[dict[str, Any]] = []
        if kind == "greedy":
            configs.append({"max_new_tokens": base["max_new_tokens"]})
        elif kind in ("best-of-n", "majority", "oracle"):
            configs.append(dict(common))
        elif kind == "rm-best-of-n":
            configs.append({**common, "reward_model": reward_model})
        elif kind == "judge-best-of-n":
            configs.append({**common, "judge_prompt": judge_prompt})
        elif kind == "adaptive":
            configs += [{**common, "anneal": base["anneal"], "threshold": t} for t in thresholds_read]
        elif kind == "prune":
            configs += [{**common, "prune_at": b, "keep": k} for b in prune_ats for k in keeps]
        elif kind == "adaptive-prune":
            configs += [
                {**common, "anneal": base["anneal"], "threshold": t, "prune_at": b, "keep": k}
                for t in thresholds
                for b in prune_ats
                for k in keeps
            ]
        for config in configs:
            config = {k: v for k, v in {**config, **extra}.items() if v is not None}
            jobs.append((method, config))
    return jobs


def method_config(
    config: dict[str, Any], seed: int | None, selfeval: SelfEvalConfig | None = None
) -> MethodConfig:
    """The ``MethodConfig`` of a job (``seed`` None: the backend is not reseeded per run)."""
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    kwargs = {k: v for k, v in config.items() if k in fields and k != "seed"}
    if selfeval is not None:
        kwargs["selfeval"] = selfeval
    return MethodConfig(**kwargs, seed=seed)


def costs_dict(costs: Costs, estimated: bool = False) -> dict[str, Any]:
    """The cost fields of a result line; an ``estimated`` line (sweep) has no wall time."""
    out = dataclasses.asdict(costs)
    out["wall_s"] = None if estimated else round(out["wall_s"], 4)
    out["estimated"] = estimated
    return out


def with_reward_reads(costs: Costs, rewards: RewardScores, wall_s: float) -> Costs:
    """``costs`` of a run whose responses a reward model then read outside the program (``rm-best-of-n``
    scores the finished samples): the reads added as the programs' meter adds them."""
    flops = sum(rewards.flops)
    return dataclasses.replace(
        costs,
        rm_reads=costs.rm_reads + len(rewards.tokens),
        rm_tokens=costs.rm_tokens + sum(rewards.tokens),
        rm_flops=costs.rm_flops + flops,
        flops=None if costs.flops is None else costs.flops + flops,
        wall_s=costs.wall_s + wall_s,
    )


@dataclass
class LiveContext:
    """What live runs need: the backend and the optional scorers."""

    backend: Any
    seed: int | None
    """Reseed the in-process backend before every run (None under --parallel > 1)."""
    judge_selfeval: SelfEvalConfig
    reward: RewardModel | None = None
    judge: Judge | None = None
    """Grades general prompts."""
    _pools: dict[tuple[str, str], Result] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def plain_pool(self, item: Item, config: dict[str, Any]) -> Result:
        """N unscored samples for ``item`` (shared by majority, oracle and rm-best-of-n)."""
        from sgl_adaptive.programs import sample_pool
        from sgl_adaptive.runner import run_program

        common = {k: config[k] for k in ("n", "max_new_tokens", "temperature", "top_p", "seed")}
        memo = (item.qid, config_hash(common))
        with self._lock:
            if memo in self._pools:
                return self._pools[memo]
        cfg = method_config(common, self.seed)
        result = run_program(sample_pool, item.prompt, self.backend, cfg, "pool", budgets=(), evaluate=False)
        with self._lock:
            self._pools[memo] = result
        return result

    def forget(self, item: Item) -> None:
        with self._lock:
            for memo in [m for m in self._pools if m[0] == item.qid]:
                del self._pools[memo]


def run_live(ctx: LiveContext, item: Item, method: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run one method on one question; return the result line's outcome fields."""
    from sgl_adaptive.programs import PROGRAMS
    from sgl_adaptive.runner import run, run_program

    if method in PLAIN_POOL:
        result = ctx.plain_pool(item, config)
        costs = result.costs
        texts = [c.text for c in result.candidates]
        if method == "rm-best-of-n":
            assert ctx.reward is not None
            start = time.perf_counter()
            rewards = ctx.reward.score(item.prompt, texts)
            costs = with_reward_reads(costs, rewards, time.perf_counter() - start)
            chosen, scores = argmax(range(len(texts)), rewards.scores), rewards.scores
        elif method == "majority":
            keys = [answer_key(item.task, t) for t in texts]
            scores = [None] * len(texts)
            chosen = Selector("majority").pick(range(len(texts)), scores, keys)
        else:
            qualities = grade(item, texts, ctx.judge)
            chosen, scores = argmax(range(len(texts)), qualities), [None] * len(texts)
    else:
        if method == "judge-best-of-n":
            cfg = method_config(config, ctx.seed, ctx.judge_selfeval)
            result = run_program(PROGRAMS["best-of-n"], item.prompt, ctx.backend, cfg, name=method)
        else:
            result = run(item.prompt, ctx.backend, base_method(method), method_config(config, ctx.seed))
        chosen, scores, costs = result.best, [c.score for c in result.candidates], result.costs
    return outcome_fields(ctx, item, result, chosen, scores, costs_dict(costs))


def outcome_fields(
    ctx: LiveContext,
    item: Item,
    result: Result,
    chosen: int,
    scores: list[float | None],
    costs: dict[str, Any],
) -> dict[str, Any]:
    texts = [c.text for c in result.candidates]
    verifiable = item.task != "general"
    qualities: list[float | None]
    if verifiable:
        qualities = list(grade(item, texts))
    else:
        qualities = [None] * len(texts)
        qualities[chosen] = grade(item, [texts[chosen]], ctx.judge)[0]
    quality = qualities[chosen]
    return {
        "quality": quality,
        "correct": bool(quality) if verifiable else None,
        "answer": answer_key(item.task, texts[chosen]),
        "reference": item.reference if verifiable else None,
        "response": texts[chosen],
        "chosen": chosen,
        "score": scores[chosen],
        "candidates": [
            {
                "tokens": c.tokens,
                "finished": c.finished,
                "pruned": c.pruned,
                "temperature": round(c.temperature, 4),
                "round": c.round,
                "score": s,
                "answer": answer_key(item.task, c.text),
                "quality": q,
            }
            for c, s, q in zip(result.candidates, scores, qualities, strict=True)
        ],
        "costs": costs,
    }
