"""The selection report of out-of-fold scores: how well scores that never saw their prompt rank, and what
they select, with paired 95% bootstrap intervals over prompts.

Input: the examples ``make_examples`` writes (one per prompt x sample x truncation budget) and one score
per example, P(No) in [0, 1], produced out of fold (e.g. ``probe.oof_probe_scores``, or a model trained
without the prompt's fold). The figures reuse ``evaluate``: ``summarize`` and ``per_budget`` (AUROC
pooled and within prompts, Brier), ``best_of_n`` (argmax against first sample, majority and oracle).
Added here:

- the score-weighted vote: every full sample votes for its extracted answer with weight w(score)
  (``WEIGHTINGS``; ``rules.vote`` decides, as at run time); the weighting is chosen on training prompts
  only, per outer fold (``oof_weighted_vote``);
- adaptive sampling replayed on each pool (``bench.sweep.adaptive``: batches ``batch_sizes(K)`` in sample
  order until the best complete score reaches the threshold), picked by argmax or by the weighted vote;
- paired intervals: differences of per-prompt rewards (``evaluate.mean_ci``) and of AUROCs between two
  scorers on the same examples (``paired_auroc_ci``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sgl_adaptive.bench.sweep import Pool as SweepPool
from sgl_adaptive.bench.sweep import PoolSample as SweepSample
from sgl_adaptive.bench.sweep import adaptive
from sgl_adaptive.finetune.evaluate import (
    PoolSample,
    best_of_n,
    by_prompt,
    mean_ci,
    per_budget,
    pool_rewards,
    sample_pools,
    select,
    summarize,
)
from sgl_adaptive.finetune.folds import split_folds, unique_in_order
from sgl_adaptive.finetune.labels import KEEP_LABEL
from sgl_adaptive.finetune.metrics import auroc, bootstrap_ci
from sgl_adaptive.finetune.scoring import ExampleScore
from sgl_adaptive.rules import score_weights, vote

WEIGHTINGS: tuple[str, ...] = (
    "sum",
    "power:2",
    "power:4",
    "power:8",
    "softmax:0.05",
    "softmax:0.1",
    "softmax:0.2",
    "logit",
)
"""The vote weightings compared: w = p (``sum``), p**a (``power:a``), the runtime ``weighted-majority``
weights exp(p / tau) / sum_j exp(p_j / tau) (``softmax:tau``, ``rules.score_weights``) and
max(0, log(p / (1 - p))) (``logit``: samples scored below 0.5 abstain)."""
DEFAULT_WEIGHTING = "softmax:0.1"
"""The runtime default (``Selector("weighted-majority")``, vote temperature 0.1): used when there are too
few prompts to choose."""
THRESHOLDS: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
"""Stop thresholds of the adaptive-sampling replay."""
_LOGIT_CLIP = 1e-6


def as_scores(scores: Sequence[float], n: int | None = None) -> list[ExampleScore]:
    """Plain scores in [0, 1] as ``ExampleScore`` (answer mass and loss unknown: nan) for ``evaluate``."""
    values = [float(s) for s in scores]
    if n is not None and len(values) != n:
        raise ValueError(f"{n} examples but {len(values)} scores")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise ValueError("scores must be finite probabilities in [0, 1]")
    return [ExampleScore(v, math.nan, math.nan, math.nan) for v in values]


def weighting_function(name: str) -> Callable[[Sequence[float]], list[float]]:
    """The vote weights of a pool's scores under weighting ``name`` (see ``WEIGHTINGS``)."""
    kind, _, arg = name.partition(":")
    try:
        value = float(arg) if arg else math.nan
    except ValueError:
        value = math.nan
    if kind == "sum" and not arg:
        return lambda scores: [float(s) for s in scores]
    if kind == "logit" and not arg:

        def logit(scores: Sequence[float]) -> list[float]:
            clipped = [min(max(float(s), _LOGIT_CLIP), 1 - _LOGIT_CLIP) for s in scores]
            return [max(0.0, math.log(p / (1 - p))) for p in clipped]

        return logit
    if kind == "power" and value > 0:
        return lambda scores: [float(s) ** value for s in scores]
    if kind == "softmax" and value > 0:
        return lambda scores: score_weights(list(scores), value)
    raise ValueError(f"unknown vote weighting {name!r}; use sum, power:A, softmax:TAU or logit (A, TAU > 0)")


def weighted_pick(pool: Sequence[PoolSample], weighting: str) -> PoolSample:
    """The score-weighted vote over a pool (in sample order): ``rules.vote`` on the extracted answers with
    the weights of ``weighting``; the earliest sample holding the winning answer. No answer at all, or
    no answered sample with a positive weight: the argmax (``evaluate.select``)."""
    answers = [p.answer for p in pool]
    weights = weighting_function(weighting)([p.score for p in pool])
    if not any(w > 0 for w, a in zip(weights, answers, strict=True) if a is not None):
        return select(pool)
    winner = vote(answers, weights)
    return next(p for p in pool if p.answer == winner)


def _pools_with_ids(
    examples: Sequence[dict[str, Any]], scores: Sequence[ExampleScore]
) -> tuple[list[list[PoolSample]], list[str]]:
    """``sample_pools`` and the prompt id of each pool (pools come in order of a prompt's first full
    example)."""
    pools = sample_pools(examples, scores)
    ids = unique_in_order([ex["prompt_id"] for ex in examples if ex["truncated_tokens"] is None])
    if len(ids) != len(pools):
        raise AssertionError("sample_pools and the prompt ids disagree")
    return pools, ids


def weighting_rewards(
    pools: Sequence[Sequence[PoolSample]], candidates: Sequence[str] = WEIGHTINGS
) -> dict[str, np.ndarray]:
    """Per-prompt reward of the weighted vote under each candidate weighting."""
    return {name: np.array([weighted_pick(p, name).reward for p in pools]) for name in candidates}


def _best_weighting(pools: Sequence[Sequence[PoolSample]], candidates: Sequence[str]) -> str:
    rewards = weighting_rewards(pools, candidates)
    order = {name: i for i, name in enumerate(candidates)}
    return max(candidates, key=lambda name: (float(rewards[name].mean()), -order[name]))


def choose_weighting(
    examples_train: Sequence[dict[str, Any]],
    scores_train: Sequence[float],
    candidates: Sequence[str] = WEIGHTINGS,
) -> str:
    """The weighting whose vote has the highest mean reward on these (training) prompts; ties to the
    earlier candidate. A weighting fits no parameter, so an inner cross-validation over these prompts
    would pool exactly these per-prompt rewards: the choice is made on them directly."""
    candidates = list(candidates)
    if not candidates:
        raise ValueError("no candidate weightings")
    for name in candidates:
        weighting_function(name)
    pools, _ = _pools_with_ids(examples_train, as_scores(scores_train, len(examples_train)))
    if not pools:
        raise ValueError("no full samples to choose a weighting on")
    return _best_weighting(pools, candidates)


def oof_weighted_vote(
    examples: Sequence[dict[str, Any]],
    scores: Sequence[float],
    candidates: Sequence[str] = WEIGHTINGS,
    *,
    folds: int = 5,
    seed: int = 0,
) -> tuple[dict[str, str], list[str]]:
    """The weighting each prompt is voted with, chosen on the other folds' prompts (``split_folds``), and
    the choice of each fold. Fewer than two prompts: ``DEFAULT_WEIGHTING``."""
    candidates = list(candidates)
    for name in candidates:
        weighting_function(name)
    pools, ids = _pools_with_ids(examples, as_scores(scores, len(examples)))
    if len(ids) < 2:
        return dict.fromkeys(ids, DEFAULT_WEIGHTING), [DEFAULT_WEIGHTING]
    pool_of = dict(zip(ids, pools, strict=True))
    of_prompt: dict[str, str] = {}
    chosen = []
    for test in split_folds(ids, min(folds, len(ids)), seed):
        held = set(test)
        name = _best_weighting([pool_of[p] for p in ids if p not in held], candidates)
        chosen.append(name)
        of_prompt.update(dict.fromkeys(test, name))
    return of_prompt, chosen


def sweep_pool(pool: Sequence[PoolSample], tokens: Sequence[int] | None = None) -> SweepPool:
    """A pool as ``bench.sweep`` replays it: every sample complete, scored once at its end, its reward the
    quality; ``tokens`` (generated tokens per sample) only feed the cost tally."""
    tokens = tokens or [1] * len(pool)
    return SweepPool(
        samples=tuple(
            SweepSample(
                tokens=max(1, t),
                finished=True,
                scores=((max(1, t), p.score),),
                quality=p.reward,
                answer=p.answer,
            )
            for p, t in zip(pool, tokens, strict=True)
        )
    )


def replay_adaptive(
    pool: Sequence[PoolSample],
    threshold: float,
    weighting: str | None = None,
    tokens: Sequence[int] | None = None,
) -> tuple[PoolSample, int, int]:
    """Adaptive sampling replayed on a pool in sample order (``bench.sweep.adaptive``: batches
    ``batch_sizes(K)``, stop once the best complete score >= ``threshold``; 1.0 never stops): (the pick,
    samples drawn, generated tokens). The pick is the argmax, or the weighted vote over the drawn samples
    under ``weighting``."""
    outcome = adaptive(sweep_pool(pool, tokens), threshold)
    drawn = len(outcome.candidates)
    pick = pool[outcome.chosen] if weighting is None else weighted_pick(pool[:drawn], weighting)
    return pick, drawn, outcome.costs.generated_tokens


def paired_ci(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of the per-prompt differences a - b and its 95% paired bootstrap interval over prompts."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return {"diff": float(diff.mean()) if len(diff) else math.nan, "ci": mean_ci(diff)}


def paired_auroc_ci(
    examples: Sequence[dict[str, Any]], scores_a: Sequence[float], scores_b: Sequence[float]
) -> dict[str, Any]:
    """Two scorers on the same examples: pooled AUROC of each and of a - b with a 95% bootstrap interval
    (resampling prompts, the same draw for both), and the mean within-prompt AUROC of each and of a - b
    (the mean of per-prompt differences over the prompts with both labels, with its interval)."""
    a = np.array([s.score for s in as_scores(scores_a, len(examples))])
    b = np.array([s.score for s in as_scores(scores_b, len(examples))])
    kept = np.array([ex["label"] == KEEP_LABEL for ex in examples], dtype=bool)
    groups = by_prompt(examples)

    def pooled_diff(draw: np.ndarray) -> float:
        idx = np.concatenate([groups[g] for g in draw])
        return auroc(a[idx], kept[idx]) - auroc(b[idx], kept[idx])

    pairs = [(auroc(a[g], kept[g]), auroc(b[g], kept[g])) for g in groups]
    pairs = [(x, y) for x, y in pairs if not math.isnan(x)]
    wa, wb = np.array([x for x, _ in pairs]), np.array([y for _, y in pairs])
    within = paired_ci(wa, wb)
    pooled_a, pooled_b = auroc(a, kept), auroc(b, kept)
    return {
        "prompts": len(groups),
        "auroc_a": pooled_a,
        "auroc_b": pooled_b,
        "auroc_diff": pooled_a - pooled_b,
        "auroc_diff_ci": bootstrap_ci(len(groups), pooled_diff),
        "within_prompt_prompts": len(pairs),
        "within_prompt_auroc_a": float(wa.mean()) if len(pairs) else math.nan,
        "within_prompt_auroc_b": float(wb.mean()) if len(pairs) else math.nan,
        "within_prompt_auroc_diff": within["diff"],
        "within_prompt_auroc_diff_ci": within["ci"],
    }


_SUMMARY_KEYS = (
    "n",
    "prompts",
    "keep_fraction",
    "auroc",
    "auroc_ci",
    "within_prompt_auroc",
    "within_prompt_prompts",
    "within_prompt_auroc_ci",
    "brier",
    "brier_soft",
    "mean_score",
)


def _gains(value: np.ndarray, against: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, base in against.items():
        pair = paired_ci(value, base)
        out[f"minus_{name}"], out[f"minus_{name}_ci"] = pair["diff"], pair["ci"]
    return out


def oof_report(
    examples: Sequence[dict[str, Any]],
    scores: Sequence[float],
    *,
    weighting: str | None = None,
    folds: int = 5,
    seed: int = 0,
    thresholds: Sequence[float] = THRESHOLDS,
    candidates: Sequence[str] = WEIGHTINGS,
) -> dict[str, Any]:
    """Every selection figure of out-of-fold ``scores`` (one per example, P(No)), intervals 95% bootstrap
    over prompts, paired where two choices are compared:

    - ``summary``: pooled AUROC, within-prompt AUROC (and prompts with both labels), Brier hard and soft;
    - ``per_budget``: the same per truncation budget, with the Best-of-K pick by the score read there;
    - ``best_of_n``: ``evaluate.best_of_n`` (argmax against first sample, majority, mean sample, oracle);
    - ``weighted_vote``: the vote under ``weighting``, or, when None, under the weighting chosen per outer
      fold on the other folds' prompts (``oof_weighted_vote``), against majority, first and argmax;
    - ``adaptive``: per threshold, mean samples and tokens drawn, the argmax and vote picks' rewards and
      their paired gains."""
    wrapped = as_scores(scores, len(examples))
    summary = summarize(examples, wrapped)
    budgets = {k: {key: v[key] for key in _SUMMARY_KEYS} for k, v in per_budget(examples, wrapped).items()}
    bon = best_of_n(examples, wrapped)
    for key, row in budgets.items():
        row["best_of_n"] = bon.get("per_budget", {}).get(key)
    report: dict[str, Any] = {
        "summary": {key: summary[key] for key in _SUMMARY_KEYS},
        "per_budget": budgets,
        "best_of_n": bon,
    }
    pools, ids = _pools_with_ids(examples, wrapped)
    if not pools:
        return {**report, "weighted_vote": None, "adaptive": []}
    if weighting is None:
        of_prompt, chosen = oof_weighted_vote(examples, scores, candidates, folds=folds, seed=seed)
    else:
        weighting_function(weighting)
        of_prompt, chosen = dict.fromkeys(ids, weighting), [weighting]
    rewards = pool_rewards(pools)
    base = {"first": rewards["first_sample"], "majority": rewards["majority"]}
    voted = np.array([weighted_pick(p, of_prompt[i]).reward for p, i in zip(pools, ids, strict=True)])
    report["weighted_vote"] = {
        "weighting": weighting or "chosen per fold",
        "chosen_per_fold": chosen,
        "reward": float(voted.mean()),
        **_gains(voted, {**base, "selected": rewards["selected"]}),
        "in_sample": {k: float(v.mean()) for k, v in weighting_rewards(pools, candidates).items()},
    }
    tokens_of = {(ex["prompt_id"], ex["sample"]): int(ex.get("response_tokens") or 1) for ex in examples}
    rows = []
    for threshold in thresholds:
        picks, drawn, spent, votes = [], [], [], []
        for pool, pid in zip(pools, ids, strict=True):
            tokens = [tokens_of.get((pid, p.index), 1) for p in pool]
            pick, n, t = replay_adaptive(pool, threshold, tokens=tokens)
            picks.append(pick.reward)
            drawn.append(n)
            spent.append(t)
            votes.append(weighted_pick(pool[:n], of_prompt[pid]).reward)
        picked, voted_at = np.array(picks), np.array(votes)
        rows.append(
            {
                "threshold": threshold,
                "samples": float(np.mean(drawn)),
                "tokens": float(np.mean(spent)),
                "reward": float(picked.mean()),
                **_gains(picked, {**base, "selected": rewards["selected"]}),
                "vote_reward": float(voted_at.mean()),
                **{f"vote_{k}": v for k, v in _gains(voted_at, base).items()},
            }
        )
    report["adaptive"] = rows
    return report


def fmt(x: Any, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_ci(value: Any, interval: Any, sign: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    low, high = interval or (None, None)
    return f"{value:{sign}.3f} [{fmt(low, 2)}, {fmt(high, 2)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_oof_table(report: dict[str, Any]) -> str:
    """Markdown tables of an ``oof_report`` (intervals: 95% bootstrap over prompts, paired for gains)."""
    s = report["summary"]
    lines = _table(
        ("metric", "value [95% CI]"),
        [
            ("examples / prompts", f"{s['n']} / {s['prompts']}"),
            ("AUROC, pooled", fmt_ci(s["auroc"], s["auroc_ci"])),
            (
                f"AUROC within prompts ({s['within_prompt_prompts']} with both labels)",
                fmt_ci(s["within_prompt_auroc"], s["within_prompt_auroc_ci"]),
            ),
            ("Brier (hard / soft)", f"{fmt(s['brier'], 4)} / {fmt(s['brier_soft'], 4)}"),
        ],
    )
    budget_rows = []
    for key, row in report["per_budget"].items():
        bon = row.get("best_of_n") or {}
        within = fmt_ci(row["within_prompt_auroc"], row["within_prompt_auroc_ci"])
        gain = fmt_ci(bon.get("selected_minus_first"), bon.get("selected_minus_first_ci"), "+")
        budget_rows.append(
            (
                "full" if key == "full" else f"{key} tok",
                f"{row['n']} / {row['prompts']}",
                fmt_ci(row["auroc"], row["auroc_ci"]),
                f"{within} ({row['within_prompt_prompts']})",
                fmt(row["brier"], 4),
                f"{fmt(bon.get('selected'))} ({gain})",
            )
        )
    header = ("budget", "n / prompts", "AUROC", "within-prompt AUROC (prompts)", "Brier", "pick (- first)")
    lines += ["", *_table(header, budget_rows)]
    bon, vote_ = report["best_of_n"], report.get("weighted_vote")
    if bon.get("prompts"):
        k = f"Best-of-{bon['pool_size']:.0f}"
        choice_rows = [
            (
                f"{k} argmax",
                fmt(bon["selected"]),
                fmt_ci(bon["selected_minus_first"], bon["selected_minus_first_ci"], "+"),
                fmt_ci(bon["selected_minus_majority"], bon["selected_minus_majority_ci"], "+"),
            ),
            ("first sample", fmt(bon["first_sample"]), "", ""),
            ("majority vote", fmt(bon["majority"]), "", ""),
            ("mean sample", fmt(bon["mean_sample"]), "", ""),
            ("oracle", fmt(bon["oracle"]), "", ""),
        ]
        if vote_:
            choice_rows.insert(
                1,
                (
                    f"weighted vote ({vote_['weighting']}: {', '.join(vote_['chosen_per_fold'])})",
                    fmt(vote_["reward"]),
                    fmt_ci(vote_["minus_first"], vote_["minus_first_ci"], "+"),
                    fmt_ci(vote_["minus_majority"], vote_["minus_majority_ci"], "+"),
                ),
            )
        lines += [
            "",
            *_table((f"{k} ({bon['prompts']} prompts)", "reward", "- first", "- majority"), choice_rows),
        ]
    if report.get("adaptive"):
        rows = [
            (
                f"{r['threshold']:g}",
                f"{r['samples']:.2f}",
                f"{r['tokens']:.0f}",
                fmt(r["reward"]),
                fmt_ci(r["minus_first"], r["minus_first_ci"], "+"),
                fmt_ci(r["minus_selected"], r["minus_selected_ci"], "+"),
                fmt(r["vote_reward"]),
                fmt_ci(r["vote_minus_majority"], r["vote_minus_majority_ci"], "+"),
            )
            for r in report["adaptive"]
        ]
        header = (
            "threshold",
            "samples",
            "tokens",
            "argmax",
            "- first",
            "- Best-of-K",
            "vote",
            "vote - majority",
        )
        lines += ["", *_table(header, rows)]
    return "\n".join(lines) + "\n"
