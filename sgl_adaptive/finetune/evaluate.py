"""``finetune eval``: how well the self-evaluation score predicts the label on held-out examples.

AUROC and Brier score against "No" (kept), in full and per truncation budget, with a 95% bootstrap
interval over prompts and the AUROC within prompts; Best-of-K selection from each held-out prompt's pool
of full samples against the first sample, majority vote and oracle (per budget and per K); the base
model's figures side by side; and how much the policy's own next-token distributions moved (KL and greedy
agreement on held-out responses).

With a few dozen held-out prompts the pooled AUROC moves by about 0.1 from one draw of prompts to the
next, so every headline figure comes with its interval and the number of prompts it rests on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sgl_adaptive.answers import extract_number
from sgl_adaptive.backends.precision import ExactHead
from sgl_adaptive.finetune.labels import KEEP_LABEL
from sgl_adaptive.finetune.metrics import auroc, bootstrap_ci, brier
from sgl_adaptive.finetune.scoring import ExampleScore, SelfEvalEncoder, left_pad
from sgl_adaptive.rules import argmax, vote


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def by_prompt(examples: Sequence[dict[str, Any]]) -> list[np.ndarray]:
    """Indices of the examples of each prompt, prompts in order of first appearance."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[ex["prompt_id"]].append(i)
    return [np.array(g) for g in groups.values()]


def auroc_ci(values: Sequence[float], kept: Sequence[bool], groups: Sequence[np.ndarray]) -> list[float]:
    """95% bootstrap interval of the pooled AUROC, resampling prompts (``groups``) with replacement."""
    v, k = np.asarray(values, dtype=float), np.asarray(kept, dtype=bool)

    def pooled(draw: np.ndarray) -> float:
        idx = np.concatenate([groups[g] for g in draw])
        return auroc(v[idx], k[idx])

    return bootstrap_ci(len(groups), pooled)


def prompt_aurocs(values: Sequence[float], kept: Sequence[bool], groups: Sequence[np.ndarray]) -> list[float]:
    """AUROC within each prompt that has both labels (the ranking of a prompt's own samples and prefixes)."""
    v, k = np.asarray(values, dtype=float), np.asarray(kept, dtype=bool)
    per_prompt = [auroc(v[g], k[g]) for g in groups]
    return [a for a in per_prompt if not math.isnan(a)]


def mean_ci(values: Sequence[float]) -> list[float]:
    """95% bootstrap interval of the mean of per-prompt ``values``, resampling prompts."""
    arr = np.asarray(values, dtype=float)
    return bootstrap_ci(len(arr), lambda draw: float(arr[draw].mean()))


def summarize(examples: Sequence[dict[str, Any]], scores: Sequence[ExampleScore]) -> dict[str, Any]:
    """AUROC (pooled, with its bootstrap interval over prompts, and within prompts), Brier (hard and soft
    targets), one-token loss and Yes/No mass of a set of examples."""
    kept = [ex["label"] == KEEP_LABEL for ex in examples]
    values = [s.score for s in scores]
    groups = by_prompt(examples)
    within = prompt_aurocs(values, kept, groups)
    return {
        "n": len(examples),
        "prompts": len(groups),
        "keep_fraction": _mean([float(k) for k in kept]),
        "auroc": auroc(values, kept),
        "auroc_ci": auroc_ci(values, kept, groups),
        "within_prompt_auroc": _mean(within),
        "within_prompt_prompts": len(within),
        "within_prompt_auroc_ci": mean_ci(within),
        "brier": brier(values, [float(k) for k in kept]),
        "brier_soft": brier(
            values, [float(ex.get("soft_no", k)) for ex, k in zip(examples, kept, strict=True)]
        ),
        "loss": _mean([s.loss for s in scores]),
        "answer_mass": _mean([s.p_no + s.p_yes for s in scores]),
        "mean_score": _mean(values),
    }


def _budget_key(truncated_tokens: int | None) -> str:
    return "full" if truncated_tokens is None else str(truncated_tokens)


def _budget_order(keys: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: (k == "full", int(k) if k != "full" else 0))


def per_budget(
    examples: Sequence[dict[str, Any]], scores: Sequence[ExampleScore]
) -> dict[str, dict[str, Any]]:
    """``summarize`` per truncation budget ("full" for complete responses)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[_budget_key(ex["truncated_tokens"])].append(i)
    return {
        k: summarize([examples[i] for i in groups[k]], [scores[i] for i in groups[k]])
        for k in _budget_order(list(groups))
    }


@dataclass
class PoolSample:
    """One full sample of a prompt's pool: its reward, final answer and scores (full and per prefix)."""

    index: int
    reward: float
    answer: str | None
    score: float
    prefix_scores: dict[int, float] = field(default_factory=dict)

    def score_at(self, budget: int | None) -> float:
        """The score read after ``budget`` tokens (the full response's when it is no longer than that)."""
        return self.score if budget is None else self.prefix_scores.get(budget, self.score)


def sample_pools(
    examples: Sequence[dict[str, Any]], scores: Sequence[ExampleScore]
) -> list[list[PoolSample]]:
    """Each prompt's full samples, by sample index, with the scores of their prefixes attached."""
    full: dict[Any, dict[int, PoolSample]] = defaultdict(dict)
    prefixes: list[tuple[Any, int, int, float]] = []
    for ex, s in zip(examples, scores, strict=True):
        if ex["truncated_tokens"] is None:
            answer = extract_number(ex["response"])
            full[ex["prompt_id"]][ex["sample"]] = PoolSample(
                ex["sample"], float(ex["reward"]), answer, s.score
            )
        else:
            prefixes.append((ex["prompt_id"], ex["sample"], ex["truncated_tokens"], s.score))
    for prompt_id, sample, budget, score in prefixes:
        if sample in full.get(prompt_id, {}):
            full[prompt_id][sample].prefix_scores[budget] = score
    return [[pool[i] for i in sorted(pool)] for pool in full.values()]


def select(pool: Sequence[PoolSample], budget: int | None = None) -> PoolSample:
    """The highest-scoring sample at ``budget`` (``rules.argmax``: ties to the earliest, as the programs do).
    ``pool`` is in sample order."""
    return pool[argmax(range(len(pool)), [p.score_at(budget) for p in pool])]


def majority(pool: Sequence[PoolSample]) -> PoolSample:
    """The earliest sample with the most frequent final answer (``rules.vote``: samples without a number do
    not vote, a tie between answers goes to the one seen first; no answer at all: the first sample)."""
    winner = vote([p.answer for p in pool])
    return next((p for p in pool if winner is not None and p.answer == winner), pool[0])


def pool_rewards(pools: Sequence[Sequence[PoolSample]], budget: int | None = None) -> dict[str, np.ndarray]:
    """Per-prompt reward of each choice: selected (by the score at ``budget``), first sample, majority vote,
    mean sample and oracle."""
    return {
        "selected": np.array([select(p, budget).reward for p in pools]),
        "first_sample": np.array([p[0].reward for p in pools]),
        "majority": np.array([majority(p).reward for p in pools]),
        "mean_sample": np.array([_mean([s.reward for s in p]) for p in pools]),
        "oracle": np.array([max(s.reward for s in p) for p in pools]),
    }


def _means(rewards: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in rewards.items()}


def best_of_n(examples: Sequence[dict[str, Any]], scores: Sequence[ExampleScore]) -> dict[str, Any]:
    """Best-of-K selection from each prompt's pool of full samples.

    Mean reward of the highest-scoring sample ("selected") against the first sample, a majority vote over
    final answers, the mean sample and the best sample (oracle); how often the pick has the best reward of
    its pool; 95% bootstrap intervals over prompts of selected - first and selected - majority; the same
    selection from the scores read at each truncation budget ("per_budget"); and from the first K samples
    for K = 2, 4, ..., pool size ("per_k")."""
    pools = sample_pools(examples, scores)
    if not pools:
        return {"prompts": 0}
    rewards = pool_rewards(pools)
    minus_first = rewards["selected"] - rewards["first_sample"]
    minus_majority = rewards["selected"] - rewards["majority"]
    budgets = sorted({b for p in pools for s in p for b in s.prefix_scores})
    by_budget: dict[str, dict[str, Any]] = {}
    for budget in [*budgets, None]:
        at = pool_rewards(pools, budget)
        gain = at["selected"] - at["first_sample"]
        by_budget[_budget_key(budget)] = {
            "selected": float(at["selected"].mean()),
            "selected_minus_first": float(gain.mean()),
            "selected_minus_first_ci": mean_ci(gain),
        }
    largest = max(len(p) for p in pools)
    return {
        "prompts": len(pools),
        "pool_size": _mean([float(len(p)) for p in pools]),
        **_means(rewards),
        "selected_is_best": float((rewards["selected"] >= rewards["oracle"]).mean()),
        "selected_minus_first": float(minus_first.mean()),
        "selected_minus_first_ci": mean_ci(minus_first),
        "selected_minus_majority": float(minus_majority.mean()),
        "selected_minus_majority_ci": mean_ci(minus_majority),
        "per_budget": by_budget,
        "per_k": {
            str(k): _means(pool_rewards([p[:k] for p in pools]))
            for k in sorted({*range(2, largest + 1, 2), largest})
            if k >= 2
        },
    }


def drift_items(examples: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` distinct full responses."""
    seen, items = set(), []
    for ex in examples:
        key = (ex["prompt_id"], ex["sample"])
        if ex["truncated_tokens"] is None and key not in seen and ex["response"]:
            seen.add(key)
            items.append(ex)
    return items[:limit]


def _response_logprobs(model: Any, ids: Any, mask: Any, pos: Any, keep: int) -> Any:
    """Next-token log-probabilities at the last ``keep`` - 1 positions (on CPU, float32; a bf16 model's
    logits are recomputed in fp32, so that rounding does not pass for drift)."""
    import torch

    with ExactHead(model) as exact, torch.no_grad():
        out = model(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            position_ids=pos.to(model.device),
            logits_to_keep=keep,
        )
        logits = out.logits[0, :-1] if exact.hidden is None else exact.all_logits(exact.hidden[0, :-1])
    return torch.log_softmax(logits.float(), -1).cpu()


def drift(
    base: Any,
    model: Any,
    encoder: SelfEvalEncoder,
    examples: Sequence[dict[str, Any]],
    *,
    limit: int = 64,
    on_item: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """How far the policy moved on its own generations: mean KL(base || model) of the next-token
    distributions over held-out response tokens (teacher-forced), and how often their argmax agrees."""

    items = drift_items(examples, limit)
    kl_sum, agree, tokens = 0.0, 0, 0
    for ex in items:
        ids, start, end = encoder.prompt_ids_and_response(ex["prompt"], ex["response"])
        if end - start < 1 or start < 1:
            continue
        ids_t, mask, pos = left_pad([ids[:end]], 0)
        keep = end - start + 1  # positions start-1 .. end-1 predict tokens start .. end
        lp_base, lp_model = (_response_logprobs(m, ids_t, mask, pos, keep) for m in (base, model))
        kl_sum += float((lp_base.exp() * (lp_base - lp_model)).sum())
        agree += int((lp_base.argmax(-1) == lp_model.argmax(-1)).sum())
        tokens += lp_base.shape[0]
        if on_item:
            on_item(1)
    return {
        "responses": len(items),
        "tokens": tokens,
        "kl_per_token": kl_sum / tokens if tokens else math.nan,
        "greedy_agreement": agree / tokens if tokens else math.nan,
    }


def evaluate_scores(examples: Sequence[dict[str, Any]], scores: Sequence[ExampleScore]) -> dict[str, Any]:
    """Everything computed from one model's scores."""
    return {
        **summarize(examples, scores),
        "per_budget": per_budget(examples, scores),
        "best_of_n": best_of_n(examples, scores),
    }


def format_table(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows (metric, base, model) for the human table; intervals are 95% bootstrap over prompts."""
    model, base = report["model"], report.get("base") or {}

    def f(x: Any, digits: int = 3) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    def ci(value: Any, interval: Any, sign: str = "") -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        low, high = interval or (None, None)
        return f"{value:{sign}.3f} [{f(low, 2)}, {f(high, 2)}]"

    def gain(r: dict[str, Any], name: str) -> str:
        return ci(r.get(f"selected_minus_{name}"), r.get(f"selected_minus_{name}_ci"), "+")

    def both(render: Callable[[dict[str, Any]], str]) -> tuple[str, str]:
        return (render(base) if base else "-", render(model))

    rows = [
        ("examples / prompts", *both(lambda r: f"{r['n']} / {r['prompts']}")),
        ("AUROC (all) [95% CI]", *both(lambda r: ci(r["auroc"], r["auroc_ci"]))),
        (
            f"AUROC within prompts ({model['within_prompt_prompts']} with both labels)",
            *both(lambda r: ci(r["within_prompt_auroc"], r["within_prompt_auroc_ci"])),
        ),
        ("Brier (all)", f(base.get("brier"), 4), f(model["brier"], 4)),
        ("one-token loss", f(base.get("loss"), 4), f(model["loss"], 4)),
        ("Yes/No mass", f(base.get("answer_mass")), f(model["answer_mass"])),
    ]
    for budget, stats in model["per_budget"].items():
        b = (base.get("per_budget") or {}).get(budget)
        label = "full" if budget == "full" else f"{budget} tok"
        rows.append(
            (
                f"AUROC [CI] / Brier @ {label} (n={stats['n']})",
                f"{ci(b['auroc'], b['auroc_ci'])} / {f(b['brier'], 4)}" if b else "-",
                f"{ci(stats['auroc'], stats['auroc_ci'])} / {f(stats['brier'], 4)}",
            )
        )
    bon, bbon = model["best_of_n"], base.get("best_of_n") or {}
    if bon.get("prompts"):

        def choices(r: dict[str, Any]) -> str:
            keys = ("selected", "first_sample", "majority", "oracle")
            return " / ".join(f(r.get(k)) for k in keys) if r else "-"

        rows.append(
            (
                f"Best-of-{bon['pool_size']:.0f} reward ({bon['prompts']} prompts): "
                "selected / first / majority / oracle",
                choices(bbon) if bbon else "-",
                choices(bon),
            )
        )
        rows.append(("  mean sample", f(bbon.get("mean_sample")), f(bon["mean_sample"])))
        for name in ("first", "majority"):
            rows.append((f"  selected - {name} [95% CI]", gain(bbon, name), gain(bon, name)))
        for budget, stats in bon["per_budget"].items():
            b = (bbon.get("per_budget") or {}).get(budget) or {}
            label = "full" if budget == "full" else f"{budget} tok"
            rows.append(
                (
                    f"  selected @ {label} (- first [CI])",
                    f"{f(b.get('selected'))} ({gain(b, 'first')})",
                    f"{f(stats['selected'])} ({gain(stats, 'first')})",
                )
            )
        for k, stats in bon["per_k"].items():
            rows.append(
                (
                    f"  Best-of-{k}: selected / first / majority / oracle",
                    choices((bbon.get("per_k") or {}).get(k) or {}),
                    choices(stats),
                )
            )
    d = report.get("drift")
    if d:
        rows.append((f"drift: KL(base||model) per token ({d['tokens']} tok)", "", f(d["kl_per_token"], 5)))
        rows.append(("drift: greedy agreement", "", f(d["greedy_agreement"])))
    return rows
