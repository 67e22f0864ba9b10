"""``finetune eval`` figures that tell signal from noise: prompts counted, bootstrap intervals over prompts,
AUROC within prompts, and Best-of-K selection against first sample, majority vote and oracle (per budget,
per K). Small hand-computable sets; the CLI test fakes the model so that no weights load."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from typer.testing import CliRunner

from sgl_adaptive.finetune.evaluate import (
    best_of_n,
    evaluate_scores,
    format_table,
    majority,
    sample_pools,
    summarize,
)
from sgl_adaptive.finetune.metrics import auroc, bootstrap_ci
from sgl_adaptive.finetune.scoring import ExampleScore


def example(prompt, sample, score, *, kept=True, reward=None, answer=None, budget=None):
    """(example, score) of one response (``budget`` None) or of its prefix at ``budget`` tokens."""
    reward = float(kept) if reward is None else reward
    response = f"so the answer is {answer}." if answer is not None else "no idea"
    ex = {
        "prompt_id": prompt,
        "prompt": f"question {prompt}",
        "sample": sample,
        "response": response,
        "text": response if budget is None else response[:budget],
        "truncated_tokens": budget,
        "label": "No" if kept else "Yes",
        "soft_no": float(kept),
        "reward": reward,
    }
    return ex, ExampleScore(score=score, p_no=score, p_yes=1 - score, loss=0.1)


def split(pairs):
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_pooled_and_within_prompt_auroc_differ_and_prompts_are_counted():
    # each prompt ranks its own samples perfectly, but prompt a scores everything higher than prompt b;
    # prompt c has one label only, so it counts in the pooled AUROC and not within prompts
    examples, scores = split(
        [
            example("a", 0, 0.9, kept=True),
            example("a", 1, 0.8, kept=False),
            example("b", 0, 0.2, kept=True),
            example("b", 1, 0.1, kept=False),
            example("c", 0, 0.5, kept=True),
            example("c", 1, 0.5, kept=True),
        ]
    )
    stats = summarize(examples, scores)
    # positives {.9, .2, .5, .5} vs negatives {.8, .1}: 2 + 1 + 1 + 1 pairs won out of 8
    assert stats["auroc"] == pytest.approx(5 / 8)
    assert stats["within_prompt_auroc"] == 1.0
    assert stats["within_prompt_prompts"] == 2
    assert stats["within_prompt_auroc_ci"] == [1.0, 1.0]
    assert stats["prompts"] == 3 and stats["n"] == 6


def test_auroc_matches_pairwise_counting_with_ties():
    rng = random.Random(3)
    scores = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(40)]
    labels = [rng.random() < 0.5 for _ in range(40)]
    pos = [s for s, k in zip(scores, labels, strict=True) if k]
    neg = [s for s, k in zip(scores, labels, strict=True) if not k]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert auroc(np.array(scores), np.array(labels)) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_bootstrap_ci_is_a_percentile_interval_and_deterministic():
    values = np.array([0.0, 1.0])
    # two groups: resample means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4
    ci = bootstrap_ci(2, lambda draw: float(values[draw].mean()))
    assert ci == [0.0, 1.0]
    narrow = bootstrap_ci(2, lambda draw: float(values[draw].mean()), level=0.4)
    assert narrow == [0.5, 0.5]
    # resamples where the statistic is undefined are skipped, not propagated
    assert bootstrap_ci(2, lambda draw: 1.0 if len(set(draw)) == 2 else math.nan) == [1.0, 1.0]
    assert all(math.isnan(x) for x in bootstrap_ci(0, lambda draw: 1.0))


def test_auroc_interval_resamples_prompts_and_contains_the_estimate():
    rng = random.Random(0)
    pairs = []
    for p in range(20):
        for s in range(6):
            kept = rng.random() < 0.5
            pairs.append(example(f"p{p}", s, rng.random() * 0.6 + 0.4 * kept, kept=kept))
    examples, scores = split(pairs)
    first, again = summarize(examples, scores), summarize(examples, scores)
    low, high = first["auroc_ci"]
    assert low < first["auroc"] < high and high - low < 0.5
    assert first["auroc_ci"] == again["auroc_ci"]  # seeded
    assert first["within_prompt_auroc_ci"] == again["within_prompt_auroc_ci"]
    lw, hw = first["within_prompt_auroc_ci"]
    assert lw <= first["within_prompt_auroc"] <= hw
    # one prompt: every resample draws the same examples, so the interval collapses to the estimate
    # (resampling examples instead would spread it)
    one = summarize(*split([example("p", i, 0.1 * i, kept=i in (1, 3, 4)) for i in range(6)]))
    assert one["prompts"] == 1 and one["auroc"] == pytest.approx(5 / 9)
    assert one["auroc_ci"] == [pytest.approx(5 / 9)] * 2


def test_auroc_interval_skips_resamples_with_one_class():
    # prompt a: all kept and scored high; prompt b: all retried and scored low. A resample of a alone (or
    # b alone) has one class: skipped; every other resample separates perfectly
    examples, scores = split(
        [example("a", i, 0.9, kept=True) for i in range(3)]
        + [example("b", i, 0.1, kept=False) for i in range(3)]
    )
    stats = summarize(examples, scores)
    assert stats["auroc"] == 1.0 and stats["auroc_ci"] == [1.0, 1.0]
    assert stats["within_prompt_prompts"] == 0 and math.isnan(stats["within_prompt_auroc"])


def test_majority_vote_breaks_ties_by_the_earliest_sample():
    examples, scores = split(
        [
            # prompt a: answers 3, 5, 5, 3 -> a 2-2 tie, won by 3 (seen first): sample 0, reward 0
            example("a", 0, 0.1, kept=False, answer=3),
            example("a", 1, 0.9, kept=True, answer=5),
            example("a", 2, 0.2, kept=True, answer=5),
            example("a", 3, 0.3, kept=False, answer=3),
            # prompt b: samples 0 and 1 have no number and do not vote; 7 beats 4: sample 2, reward 1
            example("b", 0, 0.8, kept=False),
            example("b", 1, 0.1, kept=False),
            example("b", 2, 0.4, kept=True, answer=7),
            example("b", 3, 0.3, kept=True, answer=7),
            example("b", 4, 0.2, kept=False, answer=4),
        ]
    )
    a, b = sample_pools(examples, scores)
    assert majority(a).index == 0 and majority(b).index == 2
    bon = best_of_n(examples, scores)
    assert bon["majority"] == pytest.approx(0.5)
    assert bon["selected"] == pytest.approx(0.5)  # a: sample 1 (reward 1); b: sample 0 (reward 0)
    assert bon["first_sample"] == 0.0 and bon["oracle"] == 1.0
    # per-prompt selected - majority: a +1, b -1
    assert bon["selected_minus_majority"] == 0.0 and bon["selected_minus_majority_ci"] == [-1.0, 1.0]
    assert bon["selected_minus_first"] == pytest.approx(0.5) and bon["selected_minus_first_ci"] == [0.0, 1.0]
    # a pool where no sample has a number: the first sample
    (none,) = sample_pools(*split([example("c", 1, 0.5), example("c", 0, 0.5, kept=False)]))
    assert majority(none).index == 0


def test_selection_per_budget_reads_the_prefix_score_or_the_full_one_for_short_responses():
    examples, scores = split(
        [
            example("a", 0, 0.6, kept=False, reward=0.0),
            example("a", 0, 0.2, kept=False, reward=0.0, budget=4),
            example("a", 0, 0.3, kept=False, reward=0.0, budget=8),
            example("a", 1, 0.5, kept=True, reward=1.0),
            example("a", 1, 0.7, kept=True, reward=1.0, budget=4),
            example("a", 1, 0.9, kept=True, reward=1.0, budget=8),
            # sample 2 is shorter than 4 tokens: no prefixes, its full score stands at every budget
            example("a", 2, 0.8, kept=False, reward=0.0),
        ]
    )
    bon = best_of_n(examples, scores)
    per_budget = bon["per_budget"]
    assert list(per_budget) == ["4", "8", "full"]
    # @4: 0.2 / 0.7 / 0.8 -> sample 2; @8: 0.3 / 0.9 / 0.8 -> sample 1; full: 0.6 / 0.5 / 0.8 -> sample 2
    assert {k: v["selected"] for k, v in per_budget.items()} == {"4": 0.0, "8": 1.0, "full": 0.0}
    assert per_budget["8"]["selected_minus_first"] == 1.0
    assert bon["selected"] == per_budget["full"]["selected"] == 0.0
    assert bon["prompts"] == 1 and bon["pool_size"] == 3


def test_best_of_k_uses_the_first_k_samples():
    rows = [(0, 0.1, 1), (0, 0.2, 1), (1, 0.9, 2), (0, 0.3, 1), (1, 0.95, 2)]  # (reward, score, answer)
    examples, scores = split(
        [
            example("a", i, score, kept=bool(r), reward=float(r), answer=ans)
            for i, (r, score, ans) in enumerate(rows)
        ]
    )
    per_k = best_of_n(examples, scores)["per_k"]
    assert list(per_k) == ["2", "4", "5"]
    assert per_k["2"] == {
        "selected": 0.0,
        "first_sample": 0.0,
        "majority": 0.0,
        "mean_sample": 0.0,
        "oracle": 0.0,
    }
    assert per_k["4"]["selected"] == 1.0 and per_k["4"]["majority"] == 0.0 and per_k["4"]["oracle"] == 1.0
    assert per_k["5"]["mean_sample"] == pytest.approx(0.4) and per_k["5"]["majority"] == 0.0


def test_table_prints_intervals_within_prompt_and_majority():
    pairs = [
        example(p, s, 0.1 * s + 0.05 * i, kept=s % 2 == 0, answer=s % 2)
        for i, p in enumerate("ab")
        for s in range(4)
    ]
    pairs += [example(p, s, 0.3, kept=s % 2 == 0, budget=4) for p in "ab" for s in range(4)]
    examples, scores = split(pairs)
    stats = evaluate_scores(examples, scores)
    rows = format_table({"model": stats, "base": stats})
    text = "\n".join(" | ".join(r) for r in rows)
    low, high = stats["auroc_ci"]
    assert f"{stats['auroc']:.3f} [{low:.2f}, {high:.2f}]" in text
    assert "AUROC within prompts (2 with both labels)" in text
    assert "selected / first / majority / oracle" in text and "selected - majority [95% CI]" in text
    assert "selected @ 4 tok" in text and "Best-of-2:" in text
    assert format_table({"model": stats})  # without a base model


def test_eval_json_carries_the_new_figures(tmp_path, monkeypatch):
    import sgl_adaptive.finetune.packing as packing
    import sgl_adaptive.finetune.scoring as scoring
    import sgl_adaptive.finetune.train  # noqa: F401  (imported now: it must not bind the patched encoder)
    import sgl_adaptive.model_store as model_store
    from sgl_adaptive.cli import app

    pairs = [example(p, s, 0.2 + 0.1 * s, kept=s > 1, answer=s // 2) for p in "abc" for s in range(4)]
    examples, fake_scores = split(pairs)
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    monkeypatch.setattr(model_store, "resolve_model", lambda name, **_: name)
    monkeypatch.setattr(scoring, "load_causal_lm", lambda path, **_: (path, None))
    monkeypatch.setattr(scoring, "SelfEvalEncoder", lambda tokenizer: None)
    monkeypatch.setattr(packing, "score_packed", lambda model, encoder, exs, **_: fake_scores[: len(exs)])

    args = [
        "finetune",
        "eval",
        "--model",
        "m",
        "--base",
        "b",
        "--data",
        str(tmp_path),
        "--drift-samples",
        "0",
    ]
    res = CliRunner().invoke(app, [*args, "--dtype", "float32", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    for section in (report, report["model"]):
        assert section["prompts"] == 3 and section["within_prompt_prompts"] == 3
        assert section["within_prompt_auroc"] == 1.0 and section["auroc"] == 1.0
        assert section["auroc_ci"] == [1.0, 1.0]
        assert {"selected", "first_sample", "majority", "oracle"} <= set(section["best_of_n"])
    assert report["auroc_before"] == report["auroc"] and report["auroc_ci_before"] == [1.0, 1.0]
    assert report["within_prompt_auroc_before"] == 1.0 and "brier_before" in report
    assert report["best_of_n"]["majority"] == 0.0  # answers 0, 0, 1, 1: the first sample's 0 wins the tie
    table = CliRunner().invoke(app, [*args, "--dtype", "float32"])
    assert table.exit_code == 0 and "majority" in table.output, table.output


def test_eval_on_cuda_without_a_gpu_is_a_one_line_error(tmp_path, monkeypatch):
    import torch

    from sgl_adaptive.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(app, ["finetune", "eval", "--data", str(tmp_path), "--device", "cuda"])
    assert res.exit_code == 2 and "error: --device cuda: no CUDA GPU is available" in res.output, res.output
    assert "Traceback" not in res.output
