"""Out-of-fold evaluation: grouped folds, the linear probe and its nested choice of penalty, the
score-weighted vote, the adaptive-sampling replay, paired intervals and the selection report. Small
synthetic data built here; no model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sgl_adaptive.finetune import oof, probe
from sgl_adaptive.finetune.evaluate import PoolSample, majority, select
from sgl_adaptive.finetune.folds import fold_indices, fold_of, fold_split, prompt_hash, split_folds
from sgl_adaptive.finetune.labels import pairwise_labels
from sgl_adaptive.finetune.metrics import auroc
from sgl_adaptive.rules import Selector

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------- folds


def test_split_folds_is_deterministic_balanced_disjoint_and_complete():
    ids = [f"q{i}" for i in range(342)]
    repeated = [p for p in ids for _ in range(3)]  # one id per example
    parts = split_folds(repeated, 5, seed=0)
    assert parts == split_folds(ids, 5, seed=0) == split_folds(list(ids), 5, seed=0)
    assert sorted(len(p) for p in parts) == [68, 68, 68, 69, 69]
    assert sorted(p for part in parts for p in part) == sorted(ids)
    assert len({p for part in parts for p in part}) == len(ids)
    assert split_folds(ids, 5, seed=1) != parts
    # dealt round-robin in hash order
    ranked = sorted(ids, key=lambda p: (prompt_hash(p, 0), p))
    assert all(ranked[i] in parts[i % 5] for i in range(len(ids)))
    train, test = fold_split(repeated, 2, 5, seed=0)
    assert test == parts[2] and not set(train) & set(test) and len(train) + len(test) == 342


def test_fold_of_is_stable_as_data_grows_and_fold_indices_group_examples():
    before = {f"q{i}": fold_of(f"q{i}", 5) for i in range(50)}
    assert all(fold_of(p, 5) == f for p, f in before.items())  # does not depend on the other prompts
    assert all(0 <= f < 5 for f in before.values()) and len(set(before.values())) == 5
    assert fold_of("q1", 5, seed=0) == prompt_hash("q1", 0) % 5
    with pytest.raises(ValueError):
        fold_of("q1", 1)
    example_ids = ["a", "a", "b", "c", "b", "d", "a", "e"]
    splits = fold_indices(example_ids, 2)
    for train, test in splits:
        assert not {example_ids[i] for i in train} & {example_ids[i] for i in test}
        assert sorted([*train, *test]) == list(range(len(example_ids)))
    assert sorted(i for _, test in splits for i in test) == list(range(len(example_ids)))


# ----------------------------------------------------------------------------------------------- probe


def _separable(n: int = 200, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    X = rng.normal(size=(n, d))
    X[:, 0] += np.where(y == 1, 3.0, -3.0)  # a clear margin along feature 0
    X = X * rng.uniform(0.5, 40, size=d) + rng.uniform(-50, 50, size=d)  # not standardised
    X[:, 3] = 7.0  # a constant feature
    return X.astype(np.float32), y


def test_probe_separates_separable_data_and_its_raw_direction_reproduces_predict():
    X, y = _separable()
    fitted = probe.fit_probe(X, y, 1e-3)
    p = fitted.predict(X)
    assert np.all((p > 0.5) == (y == 1))
    assert auroc(p, y == 1) == 1.0
    assert fitted.grad_max < 1e-4
    raw = 1 / (1 + np.exp(-(X.astype(np.float64) @ fitted.direction.astype(np.float64) + fitted.bias)))
    np.testing.assert_allclose(raw, p, atol=2e-5)
    # the constant feature carries (next to) nothing; the raw bias absorbs its value
    assert abs(fitted.direction[3]) < 1e-3 * np.linalg.norm(fitted.direction)
    # bf16 torch features give (nearly) the same probe
    bf16 = probe.fit_probe(torch.from_numpy(X).bfloat16(), y, 1e-3)
    assert auroc(bf16.predict(X), y == 1) == 1.0
    # a larger penalty shrinks the weights
    assert np.linalg.norm(probe.fit_probe(X, y, 1.0).weight) < np.linalg.norm(fitted.weight)


def test_probe_soft_targets_and_its_optimum():
    X, _ = _separable()
    constant = probe.fit_probe(X, np.full(len(X), 0.3), 1e-2)
    np.testing.assert_allclose(constant.predict(X), 0.3, atol=1e-4)
    # at the optimum the objective's gradient vanishes: mean (p - y) z + l2 w = 0
    rng = np.random.default_rng(1)
    soft = rng.uniform(0, 1, len(X))
    fitted = probe.fit_probe(X, soft, 0.1)
    z = (X - fitted.mean) / fitted.scale
    grad = z.T @ (fitted.predict(X) - soft) / len(X) + 0.1 * fitted.weight
    assert np.abs(grad).max() < 1e-4
    with pytest.raises(ValueError):
        probe.fit_probe(X, soft + 1, 0.1)


def _prompt_data(prompts: int = 30, per: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rows of ``prompts`` prompts whose label depends on feature 0 within every prompt."""
    rng = np.random.default_rng(seed)
    ids = [f"p{i // per}" for i in range(prompts * per)]
    y = np.array([i % 2 for i in range(prompts * per)], dtype=float)
    X = rng.normal(size=(len(ids), 8))
    X[:, 0] += 1.5 * (2 * y - 1)
    X[:, 1] += np.repeat(rng.normal(size=prompts) * 3, per)  # a per-prompt offset
    return X.astype(np.float32), y, ids


def test_inner_cv_never_sees_the_outer_test_prompts(monkeypatch):
    X, y, ids = _prompt_data()
    calls: list[set[str]] = []
    real = probe.choose_l2

    def spy(X_train: Any, y_train: Any, ids_train: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(set(ids_train))
        assert len(ids_train) == len(X_train) == len(y_train)
        return real(X_train, y_train, ids_train, *args, **kwargs)

    monkeypatch.setattr(probe, "choose_l2", spy)
    grid = (1e-3, 1.0)
    scores, chosen = probe.oof_probe_scores(X, y, ids, folds=3, l2_grid=grid, seed=0, min_prompts=5)
    parts = split_folds(ids, 3, 0)
    assert len(calls) == 3 and len(chosen) == 3 and set(chosen) <= set(grid)
    for seen, test, l2, (train_idx, test_idx) in zip(
        calls, parts, chosen, fold_indices(ids, 3, 0), strict=True
    ):
        assert not seen & set(test)
        assert seen == set(ids) - set(test)
        # the test fold's scores come from a probe fitted on the training rows only
        expected = probe.fit_probe(X[train_idx], y[train_idx], l2).predict(X[test_idx])
        np.testing.assert_allclose(scores[test_idx], expected, atol=1e-6)
    assert probe.selection_auroc(scores, y == 1, ids, min_prompts=5) > 0.8


def test_oof_probe_scores_do_not_memorise_prompts():
    # labels constant per prompt and random; a one-hot prompt feature predicts them in sample only
    rng = np.random.default_rng(3)
    prompts, per = 40, 5
    ids = [f"p{i // per}" for i in range(prompts * per)]
    y = np.repeat(rng.integers(0, 2, prompts), per).astype(float)
    X = np.repeat(np.eye(prompts), per, axis=0) + 0.01 * rng.normal(size=(prompts * per, prompts))
    in_sample = probe.fit_probe(X, y, 1e-3).predict(X)
    assert auroc(in_sample, y == 1) > 0.99
    scores, _ = probe.oof_probe_scores(X, y, ids, folds=4, l2_grid=(1e-3, 1.0))
    assert auroc(scores, y == 1) < 0.75


# ------------------------------------------------------------------------------------------------ votes


def _pool(scores: list[float], answers: list[str | None], rewards: list[float]) -> list[PoolSample]:
    return [PoolSample(i, r, a, s) for i, (s, a, r) in enumerate(zip(scores, answers, rewards, strict=True))]


# "7": 0.9 + 0.1 + 0.1 = 1.1 (3 votes); "9": 0.6 + 0.6 = 1.2 (2 votes)
VOTE_POOL = _pool([0.9, 0.1, 0.1, 0.6, 0.6], ["7", "7", "7", "9", "9"], [0.0, 0.0, 0.0, 1.0, 1.0])


def test_weighted_vote_sum_picks_largest_total_probability_not_argmax_or_majority():
    assert oof.weighted_pick(VOTE_POOL, "sum").index == 3  # the earliest "9"
    assert select(VOTE_POOL).index == 0  # argmax: "7"
    assert majority(VOTE_POOL).index == 0  # 3 votes for "7"
    assert oof.weighted_pick(VOTE_POOL, "power:2").answer == "7"  # 0.83 > 0.72
    assert oof.weighted_pick(VOTE_POOL, "logit").answer == "7"  # 2.20 > 2 x 0.41; 0.1 abstains


def test_softmax_weighting_is_the_runtime_weighted_majority():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 9))
        scores = rng.uniform(0, 1, n).round(2).tolist()
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(n)]
        pool = _pool(scores, answers, [0.0] * n)
        for tau in (0.05, 0.1, 0.2):
            runtime = Selector("weighted-majority", tau).pick(range(n), scores, answers)
            assert oof.weighted_pick(pool, f"softmax:{tau}").index == runtime, (trial, tau)


def test_weighted_vote_fallbacks_and_names():
    none = _pool([0.2, 0.7, 0.4], [None, None, None], [0.0, 1.0, 0.0])
    assert oof.weighted_pick(none, "sum").index == 1  # no answer: argmax
    abstain = _pool([0.2, 0.4, 0.3], ["1", "2", "2"], [0.0, 0.0, 1.0])
    assert oof.weighted_pick(abstain, "logit").index == 1  # nobody above 0.5: argmax
    for bad in ("power", "power:-1", "softmax:0", "sum:2", "median"):
        with pytest.raises(ValueError):
            oof.weighting_function(bad)


# --------------------------------------------------------------------------------------------- examples


def _examples(
    prompts: int = 12, k: int = 4, seed: int = 0, budgets: tuple[int, ...] = (16, 32)
) -> list[dict[str, Any]]:
    """Verifier-labelled examples: correct samples answer 42, wrong ones 1, 2 or 3; 40 tokens each."""
    rng = np.random.default_rng(seed)
    out = []
    for q in range(prompts):
        rewards = rng.integers(0, 2, k).astype(float).tolist()
        labels = pairwise_labels(rewards, 0.5)
        for s, (r, lab) in enumerate(zip(rewards, labels, strict=True)):
            answer = "42" if r else str(int(rng.integers(1, 4)))
            base = {
                "prompt_id": f"q{q}",
                "sample": s,
                "prompt": f"question {q}",
                "response": f"work... so the answer is {answer}.",
                "response_tokens": 40,
                "reward": r,
                "label": lab.label,
                "soft_no": lab.soft_no,
            }
            out.append({**base, "truncated_tokens": None})
            out.extend({**base, "truncated_tokens": b} for b in budgets)
    return out


def _pool_examples(pool: list[PoolSample], prompt: str = "q") -> tuple[list[dict[str, Any]], list[float]]:
    labels = pairwise_labels([p.reward for p in pool], 0.5)
    examples = [
        {
            "prompt_id": prompt,
            "sample": p.index,
            "response": f"the answer is {p.answer}" if p.answer else "no idea",
            "response_tokens": 10 * (p.index + 1),
            "truncated_tokens": None,
            "reward": p.reward,
            "label": lab.label,
            "soft_no": lab.soft_no,
        }
        for p, lab in zip(pool, labels, strict=True)
    ]
    return examples, [p.score for p in pool]


def test_choose_weighting_maximises_training_reward():
    examples, scores = _pool_examples(VOTE_POOL)
    assert oof.choose_weighting(examples, scores, ["power:2", "sum", "logit"]) == "sum"
    assert oof.choose_weighting(examples, scores, ["power:2", "logit"]) == "power:2"  # tie: the earlier


def test_oof_weighted_vote_chooses_on_the_other_folds_only():
    # half the prompts reward "sum", half "power:2"; each fold's choice must follow the other folds
    examples, scores = [], []
    flipped = [p.__class__(p.index, 1.0 - p.reward, p.answer, p.score) for p in VOTE_POOL]
    for q in range(6):
        ex, sc = _pool_examples(VOTE_POOL if q < 4 else flipped, f"q{q}")
        examples += ex
        scores += sc
    of_prompt, chosen = oof.oof_weighted_vote(examples, scores, ["power:2", "sum"], folds=3)
    ids = [f"q{q}" for q in range(6)]
    for test in split_folds(ids, 3, 0):
        train = [q for q in ids if q not in test]
        expected = "sum" if sum(q in ("q0", "q1", "q2", "q3") for q in train) > 2 else "power:2"
        assert {of_prompt[q] for q in test} == {expected}
    assert sorted(of_prompt) == ids and len(chosen) == 3
    assert len(set(chosen)) == 2  # the folds disagree: a choice on all prompts would not


# --------------------------------------------------------------------------------------------- adaptive


# batches 1, 1, 2, 4 over 8 samples
ADAPTIVE_POOL = _pool(
    [0.3, 0.6, 0.95, 0.2, 0.5, 0.99, 0.1, 0.4],
    ["1", "2", "3", "2", "2", "4", "2", "2"],
    [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
)


@pytest.mark.parametrize(
    ("threshold", "drawn", "chosen"),
    [(0.3, 1, 0), (0.5, 2, 1), (0.9, 4, 2), (0.96, 8, 5), (0.995, 8, 5), (1.0, 8, 5)],
)
def test_adaptive_replay_stops_at_the_expected_sample(threshold, drawn, chosen):
    tokens = [10 * (i + 1) for i in range(8)]
    pick, n, spent = oof.replay_adaptive(ADAPTIVE_POOL, threshold, tokens=tokens)
    assert (n, pick.index) == (drawn, chosen)
    assert spent == sum(tokens[:drawn])


def test_adaptive_replay_with_the_weighted_vote_votes_over_drawn_samples_only():
    pick, n, _ = oof.replay_adaptive(ADAPTIVE_POOL, 0.9, weighting="sum")
    assert n == 4 and pick.index == 2  # drawn: "3" 0.95 > "2" 0.6 + 0.2
    assert oof.weighted_pick(ADAPTIVE_POOL, "sum").index == 1  # all 8: "2" totals 1.8


# ---------------------------------------------------------------------------------------------- intervals


def test_paired_ci_of_a_constant_difference_is_that_constant():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=50)
    pair = oof.paired_ci(a, a - 0.25)
    assert pair["diff"] == pytest.approx(0.25)
    assert pair["ci"] == pytest.approx([0.25, 0.25])
    noisy = oof.paired_ci(a, rng.uniform(size=50))
    assert noisy["ci"][0] < noisy["diff"] < noisy["ci"][1]


def test_paired_auroc_ci():
    examples = _examples(prompts=10, k=4, seed=1)
    kept = [float(ex["label"] == "No") for ex in examples]
    same = oof.paired_auroc_ci(examples, kept, kept)
    assert same["auroc_diff"] == 0.0 and same["auroc_diff_ci"] == [0.0, 0.0]
    flipped = oof.paired_auroc_ci(examples, kept, [1.0 - k for k in kept])
    assert (flipped["auroc_a"], flipped["auroc_b"]) == (1.0, 0.0)
    assert flipped["auroc_diff_ci"] == [1.0, 1.0]
    assert flipped["within_prompt_auroc_diff"] == 1.0 and flipped["within_prompt_auroc_diff_ci"] == [1.0, 1.0]
    mixed = [0.5 if ex["truncated_tokens"] else k for ex, k in zip(examples, kept, strict=True)]
    partial = oof.paired_auroc_ci(examples, kept, mixed)
    assert partial["auroc_diff"] > 0 and partial["auroc_diff_ci"][0] <= partial["auroc_diff"]


# ------------------------------------------------------------------------------------------------ report


def test_oof_report_on_scores_equal_to_the_label():
    examples = _examples(prompts=12, k=4, seed=0)
    scores = [float(ex["label"] == "No") for ex in examples]
    report = oof.oof_report(examples, scores, folds=3)
    s = report["summary"]
    assert s["auroc"] == 1.0 and s["within_prompt_auroc"] == 1.0
    assert (
        s["within_prompt_prompts"]
        == sum(len({ex["label"] for ex in examples if ex["prompt_id"] == f"q{q}"}) == 2 for q in range(12))
        > 0
    )
    assert s["brier"] == 0.0
    bon = report["best_of_n"]
    assert bon["selected"] == bon["oracle"] and bon["selected_is_best"] == 1.0
    assert set(report["per_budget"]) == {"16", "32", "full"}
    for row in report["per_budget"].values():
        assert row["within_prompt_auroc"] == 1.0
        assert row["best_of_n"]["selected"] == bon["oracle"]
    vote_ = report["weighted_vote"]
    assert vote_["reward"] == bon["oracle"] and len(vote_["chosen_per_fold"]) == 3
    assert vote_["minus_majority"] == pytest.approx(bon["oracle"] - bon["majority"])
    first = [r for r in report["adaptive"] if r["threshold"] == 0.5][0]
    assert first["reward"] == bon["oracle"] and first["samples"] < 4
    assert first["minus_selected"] == 0.0 and first["minus_selected_ci"] == [0.0, 0.0]
    table = oof.format_oof_table(report)
    assert "AUROC within prompts" in table and "weighted vote" in table and "| 0.99 |" in table
    fixed = oof.oof_report(examples, scores, weighting="power:4", thresholds=(0.9,))
    assert fixed["weighted_vote"]["chosen_per_fold"] == ["power:4"] and len(fixed["adaptive"]) == 1


def test_oof_report_rejects_bad_scores():
    examples = _examples(prompts=3, k=2)
    with pytest.raises(ValueError):
        oof.oof_report(examples, [0.5] * (len(examples) - 1))
    with pytest.raises(ValueError):
        oof.oof_report(examples, [1.5] * len(examples))
    with pytest.raises(ValueError):
        oof.oof_report(examples, [0.5] * len(examples), weighting="softmax")
