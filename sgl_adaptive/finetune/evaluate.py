"""``finetune eval``: how well the self-evaluation score predicts the label on held-out examples.

AUROC and Brier score against "No" (kept), in full and per truncation budget; Best-of-N selection from
each held-out prompt's pool of full samples; the base model's figures side by side; and how much the
policy's own next-token distributions moved (KL and greedy agreement on held-out responses).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from sgl_adaptive.backends.precision import ExactHead
from sgl_adaptive.finetune.labels import KEEP_LABEL
from sgl_adaptive.finetune.metrics import auroc, brier
from sgl_adaptive.finetune.scoring import ExampleScore, SelfEvalEncoder, left_pad


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summarize(examples: Sequence[dict[str, Any]], scores: Sequence[ExampleScore]) -> dict[str, Any]:
    """AUROC, Brier (hard and soft targets), one-token loss and Yes/No mass of a set of examples."""
    kept = [ex["label"] == KEEP_LABEL for ex in examples]
    values = [s.score for s in scores]
    return {
        "n": len(examples),
        "keep_fraction": _mean([float(k) for k in kept]),
        "auroc": auroc(values, kept),
        "brier": brier(values, [float(k) for k in kept]),
        "brier_soft": brier(
            values, [float(ex.get("soft_no", k)) for ex, k in zip(examples, kept, strict=True)]
        ),
        "loss": _mean([s.loss for s in scores]),
        "answer_mass": _mean([s.p_no + s.p_yes for s in scores]),
        "mean_score": _mean(values),
    }


def per_budget(
    examples: Sequence[dict[str, Any]], scores: Sequence[ExampleScore]
) -> dict[str, dict[str, Any]]:
    """``summarize`` per truncation budget ("full" for complete responses)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups["full" if ex["truncated_tokens"] is None else str(ex["truncated_tokens"])].append(i)
    order = sorted(groups, key=lambda k: (k == "full", int(k) if k != "full" else 0))
    return {k: summarize([examples[i] for i in groups[k]], [scores[i] for i in groups[k]]) for k in order}


def best_of_n(examples: Sequence[dict[str, Any]], scores: Sequence[ExampleScore]) -> dict[str, Any]:
    """Pick the highest-scoring full sample of each prompt (ties: earliest sample, as the programs do).

    Reports the mean reward of the pick against the first sample (one sample), the mean sample and the
    best sample (oracle), and how often the pick has the best reward of its pool."""
    pools: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for ex, s in zip(examples, scores, strict=True):
        if ex["truncated_tokens"] is None:
            pools[ex["prompt_id"]].append((ex["sample"], s.score, float(ex["reward"])))
    if not pools:
        return {"prompts": 0}
    picked, first, mean, oracle, is_best = [], [], [], [], []
    for pool in pools.values():
        pool.sort()
        choice = max(pool, key=lambda p: (p[1], -p[0]))
        best = max(p[2] for p in pool)
        picked.append(choice[2])
        first.append(pool[0][2])
        mean.append(_mean([p[2] for p in pool]))
        oracle.append(best)
        is_best.append(float(choice[2] >= best))
    return {
        "prompts": len(pools),
        "pool_size": _mean([float(len(p)) for p in pools.values()]),
        "selected": _mean(picked),
        "first_sample": _mean(first),
        "mean_sample": _mean(mean),
        "oracle": _mean(oracle),
        "selected_is_best": _mean(is_best),
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
    """Rows (metric, base, model) for the human table."""
    model, base = report["model"], report.get("base") or {}

    def f(x: Any, digits: int = 3) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    rows = [
        ("examples", str(base.get("n", "-")), str(model["n"])),
        ("AUROC (all)", f(base.get("auroc")), f(model["auroc"])),
        ("Brier (all)", f(base.get("brier"), 4), f(model["brier"], 4)),
        ("one-token loss", f(base.get("loss"), 4), f(model["loss"], 4)),
        ("Yes/No mass", f(base.get("answer_mass")), f(model["answer_mass"])),
    ]
    for budget, stats in model["per_budget"].items():
        b = (base.get("per_budget") or {}).get(budget, {})
        label = "full" if budget == "full" else f"{budget} tok"
        rows.append(
            (
                f"AUROC / Brier @ {label} (n={stats['n']})",
                f"{f(b.get('auroc'))} / {f(b.get('brier'), 4)}",
                f"{f(stats['auroc'])} / {f(stats['brier'], 4)}",
            )
        )
    bon, bbon = model["best_of_n"], base.get("best_of_n") or {}
    if bon.get("prompts"):
        rows.append(
            (
                f"Best-of-{bon['pool_size']:.0f} reward, selected ({bon['prompts']} prompts)",
                f(bbon.get("selected")),
                f(bon["selected"]),
            )
        )
        rows.append(
            (
                "  first sample / mean / oracle",
                "",
                f"{f(bon['first_sample'])} / {f(bon['mean_sample'])} / {f(bon['oracle'])}",
            )
        )
    d = report.get("drift")
    if d:
        rows.append((f"drift: KL(base||model) per token ({d['tokens']} tok)", "", f(d["kl_per_token"], 5)))
        rows.append(("drift: greedy agreement", "", f(d["greedy_agreement"])))
    return rows
