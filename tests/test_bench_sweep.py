"""Sweep simulations on a hand-made pool: selection, stopping, pruning, costs and the paper's metric."""

from __future__ import annotations

import pytest

from sgl_adaptive.bench.sweep import (
    Pool,
    PoolSample,
    adaptive,
    adaptive_prune,
    best_of,
    budget_matched,
    greedy,
    majority,
    oracle,
    percent_of_max,
    prune,
    sample_counts,
    samples_within,
    simulate,
    sweep_grid,
)
from sgl_adaptive.costs import ModelShape, request_flops

SHAPE = ModelShape(n_layers=2, hidden=8, attn_dim=8, vocab=16, body_params=1000)

# max_new_tokens 32, scored at 8 and 16 tokens and at the end; draw order = index
POOL = Pool(
    samples=(
        PoolSample(20, True, ((8, 0.5), (16, 0.6), (20, 0.55)), 0.0, "3", rm=0.1, rm_tokens=40, judge=0.2),
        PoolSample(12, True, ((8, 0.7), (12, 0.9)), 1.0, "5", rm=0.9, rm_tokens=30, judge=0.6),
        PoolSample(32, False, ((8, 0.8), (16, 0.4), (32, 0.95)), 1.0, "5", rm=0.5, rm_tokens=50, judge=0.6),
        PoolSample(6, True, ((6, 0.3),), 0.0, "7", rm=0.95, rm_tokens=26, judge=0.1),
    ),
    prompt_tokens=10,
    eval_tokens=5,
    shape=SHAPE,
)


def test_greedy_is_the_first_sample_with_its_flops():
    out = greedy(POOL)
    assert (out.chosen, out.quality) == (0, 0.0)
    c = out.costs
    assert (c.samples, c.batches, c.generated_tokens, c.self_evals) == (1, 1, 20, 0)
    assert c.flops == request_flops(SHAPE, 10, 0, 20)
    assert c.prefill_tokens == 10


@pytest.mark.parametrize(("k", "chosen"), [(1, 0), (2, 1), (4, 2)])
def test_best_of_k_by_self_evaluation(k, chosen):
    out = best_of(POOL, k)
    assert out.chosen == chosen
    assert out.costs.samples == k and out.costs.self_evals == k and out.costs.batches == 1
    assert out.costs.eval_prefill_tokens == 5 * k


def test_best_of_by_reward_model_and_judge():
    rm = best_of(POOL, 4, "rm")
    assert rm.chosen == 3 and rm.quality == 0.0
    assert rm.costs.self_evals == 0 and (rm.costs.rm_reads, rm.costs.rm_tokens) == (4, 146)
    judge = best_of(POOL, 4, "judge")
    assert judge.chosen == 1  # tie 0.6/0.6: the earliest drawn
    assert judge.costs.self_evals == 4


def test_ties_go_to_the_earliest_sample():
    tie = Pool(
        (
            PoolSample(4, True, ((4, 0.7),), 0.0),
            PoolSample(4, True, ((4, 0.9),), 0.0),
            PoolSample(4, True, ((4, 0.9),), 1.0),
        )
    )
    assert best_of(tie, 3).chosen == 1


def test_majority_and_oracle():
    assert majority(POOL, 4).chosen == 1  # "5" twice
    assert majority(POOL, 2).chosen == 0  # "3" vs "5": the answer seen first
    assert oracle(POOL, 1).quality == 0.0 and oracle(POOL, 2).quality == 1.0
    assert oracle(POOL, 4).chosen == 1


@pytest.mark.parametrize(
    ("threshold", "samples", "batches", "chosen", "generated"),
    [
        (0.5, 1, 1, 0, 20),  # the first sample scores 0.55: stop
        (0.9, 2, 2, 1, 32),  # the second scores 0.9
        (0.92, 4, 3, 2, 70),  # batches 1, 1, 2
        (1.0, 4, 3, 2, 70),  # 1.0 never stops
    ],
)
def test_adaptive_sampling_stops_at_the_threshold(threshold, samples, batches, chosen, generated):
    out = adaptive(POOL, threshold)
    c = out.costs
    assert (c.samples, c.batches, out.chosen, c.generated_tokens) == (
        samples,
        batches,
        chosen,
        generated,
    )
    assert c.self_evals == samples


def test_adaptive_critical_path_is_the_longest_sample_of_each_batch():
    assert adaptive(POOL, 1.0).costs.critical_path_tokens == 20 + 12 + 32


def test_pruning_keeps_top_k_and_counts_only_the_budget_for_pruned_samples():
    out = prune(POOL, 8, 1)
    # scores at 8: 0.5, 0.7, 0.8, and sample 3 finished at 6 (0.3, complete): sample 2 continues
    assert out.chosen == 2 and out.quality == 1.0
    c = out.costs
    assert c.generated_tokens == 8 + 8 + 8 + 6 + 24
    assert c.self_evals == 4 + 1
    assert c.critical_path_tokens == 8 + 24
    assert (c.samples, c.batches) == (4, 1)


def test_pruning_after_a_sample_finished_uses_its_final_score():
    out = prune(POOL, 16, 1)  # sample 1 finished at 12 with 0.9: it ranks first and is complete
    assert out.chosen == 1
    assert out.costs.generated_tokens == 16 + 12 + 16 + 6
    assert out.costs.self_evals == 4
    two = prune(POOL, 16, 2)  # sample 0 (0.6 at 16) continues to 20 and ends at 0.55
    assert two.chosen == 1 and two.costs.generated_tokens == 54 and two.costs.self_evals == 5


def test_adaptive_pruning_prunes_each_round():
    out = adaptive_prune(POOL, 1.0, 8, 2)  # rounds 1, 1, 2; each keeps ceil(size * 2 / 4) = 1
    assert out.chosen == 2
    c = out.costs
    assert (c.samples, c.batches) == (4, 3)
    assert c.self_evals == 2 + 2 + 3
    assert c.generated_tokens == 20 + 12 + (8 + 6 + 24)
    early = adaptive_prune(POOL, 0.5, 8, 2)
    assert early.costs.samples == 1 and early.chosen == 0


def test_a_pruning_budget_outside_the_pool_is_an_error():
    with pytest.raises(ValueError, match="no self-evaluation at 10"):
        prune(POOL, 10, 1)


def test_percent_of_maximum_improvement():
    assert percent_of_max(0.75, 0.5, 1.0) == pytest.approx(50.0)
    assert percent_of_max(1.0, 0.5, 1.0) == pytest.approx(100.0)
    assert percent_of_max(0.4, 0.5, 1.0) == pytest.approx(-20.0)
    assert percent_of_max(0.7, 0.5, 0.5) is None
    assert percent_of_max(0.0, 0.2, 0.0) is None  # Best-of-N worse than greedy: undefined, not 100%


def test_grid_and_simulate_cover_every_method():
    methods = ["greedy", "best-of-n", "rm-best-of-n", "judge-best-of-n", "majority", "oracle"]
    methods += ["adaptive", "prune", "adaptive-prune"]
    methods += ["weighted-majority", "adaptive-consistency", "esc", "random-prune", "budget-matched"]
    grid = sweep_grid(methods, 4, [0.9, 1.0], [8, 16], [1, 2], 8, 1)
    assert sample_counts(4) == [1, 2, 4] and sample_counts(5) == [1, 2, 4, 5]
    assert len(grid) == 1 + 5 * 3 + 2 + 4 + 2 + (3 + 1 + 1 + 4 + 4)
    assert [c for m, c in grid if m == "budget-matched"] == [c for m, c in grid if m == "prune"]
    assert sweep_grid(["adaptive-no-anneal", "best-of-n-anneal"], 4, [0.9], [8], [1], 8, 1) == []
    for method, config in grid:
        out = simulate(POOL, method, config)
        assert 0 <= out.chosen < 4 and out.costs.flops > 0


def test_average_samples_and_accuracy_at_a_threshold_over_questions():
    easy = Pool((PoolSample(5, True, ((5, 0.97),), 1.0), PoolSample(5, True, ((5, 0.5),), 0.0)))
    runs = [adaptive(pool, 0.9) for pool in (POOL, easy)]
    assert sum(r.costs.samples for r in runs) / 2 == 1.5  # 2 samples, then 1
    assert sum(r.quality for r in runs) / 2 == 1.0
    assert sum(r.costs.batches for r in runs) / 2 == 1.5


def test_variants_are_their_base_method_with_rules():
    wm = simulate(
        POOL, "weighted-majority", {"n": 4, "selector": "weighted-majority", "vote_temperature": 0.1}
    )
    # weights exp(s / 0.1): "5" (0.9, 0.95) outweighs "3" (0.55) and "7" (0.3)
    assert wm.chosen == 1 and wm.costs.self_evals == 4
    ac = simulate(POOL, "adaptive-consistency", {"n": 4, "selector": "majority", "stop": "beta"})
    # answers 3, 5, 5, 7: never confident; majority "5", and no sample is self-evaluated
    assert (ac.chosen, ac.costs.samples, ac.costs.batches, ac.costs.self_evals) == (1, 4, 3, 0)


AGREE = Pool(tuple(PoolSample(4, True, ((4, 0.5),), 1.0, "9" if i == 0 else "4") for i in range(16)))


@pytest.mark.parametrize(
    ("config", "samples", "batches"),
    [
        ({"stop": "beta"}, 8, 4),  # after 4: 3 vs 1 (26/32); after 8: 7 vs 1 (502/512 > 0.95)
        ({"stop": "beta", "stop_confidence": 0.8}, 4, 3),  # 26/32 = 0.8125 > 0.8
        ({"stop": "esc"}, 8, 4),  # the last 4 of 8 agree; of 4 they do not (9, 4, 4, 4)
        ({"stop": "esc", "stop_window": 2}, 4, 3),
    ],
)
def test_answer_agreement_stops(config, samples, batches):
    out = simulate(AGREE, "adaptive", {"n": 16, "selector": "majority", **config})
    assert (out.costs.samples, out.costs.batches, out.costs.self_evals) == (samples, batches, 0)
    assert out.chosen == 1  # "4", its earliest sample


def test_random_pruning_keeps_a_seeded_random_choice_without_scoring_it():
    from sgl_adaptive.rules import random_rank

    for seed in range(4):
        out = simulate(
            POOL, "random-prune", {"n": 4, "prune_at": 8, "keep": 1, "prune_by": "random", "seed": seed}
        )
        (kept,) = random_rank(range(4), 1, seed)
        continued = [] if kept == 3 else [kept]  # sample 3 finished at 6 tokens: complete, scored once
        assert out.costs.self_evals == 1 + len(continued)
        assert out.chosen == max([3, *continued], key=lambda i: (POOL.samples[i].final_score, -i))
    assert {tuple(random_rank(range(8), 2, seed)) for seed in range(10)} != {(0, 1)}


def test_live_jobs_of_the_variants():
    from sgl_adaptive.bench.methods import live_jobs

    base = dict(n=8, max_new_tokens=64, temperature=0.7, top_p=1.0, seed=0, anneal="paper")
    jobs = live_jobs(
        ["adaptive", "adaptive-consistency", "adaptive-no-anneal", "best-of-n-anneal", "random-prune"],
        base,
        [0.9, 0.98],
        [16],
        [2],
    )
    by_method: dict[str, list[dict]] = {}
    for method, config in jobs:
        by_method.setdefault(method, []).append(config)
    assert [c["threshold"] for c in by_method["adaptive"]] == [0.9, 0.98]
    (ac,) = by_method["adaptive-consistency"]
    assert "threshold" not in ac and (ac["stop"], ac["selector"]) == ("beta", "majority")
    assert [c["anneal"] for c in by_method["adaptive-no-anneal"]] == ["none", "none"]
    assert by_method["best-of-n-anneal"][0]["anneal_best_of_n"] is True
    assert by_method["random-prune"] == [
        {
            **{k: base[k] for k in ("n", "max_new_tokens", "temperature", "top_p", "seed")},
            "prune_at": 16,
            "keep": 2,
            "prune_by": "random",
        }
    ]


def test_each_method_is_refused_in_the_mode_it_does_not_run_in(tmp_path):
    from sgl_adaptive.bench.harness import BenchOptions, validate
    from sgl_adaptive.errors import UserError

    for method, mode, other in (
        ("adaptive-no-anneal", "sweep", "live"),
        ("best-of-n-anneal", "sweep", "live"),
        ("budget-matched", "live", "sweep"),
    ):
        opts = BenchOptions("gsm8k-dev", tmp_path / "out", methods=[method], mode=mode)
        with pytest.raises(UserError, match=f"^{method} runs in {other} mode only: use --mode {other} "):
            validate(opts)
    sweep = validate(
        BenchOptions("gsm8k-dev", tmp_path / "out", methods=["all"], mode="sweep", reward_model="rm")
    ).methods
    live = validate(BenchOptions("gsm8k-dev", tmp_path / "out", methods=["all"], reward_model="rm")).methods
    assert "esc" in sweep and "budget-matched" in sweep and "best-of-n-anneal" not in sweep
    assert "best-of-n-anneal" in live and "budget-matched" not in live


def test_every_method_has_configurations_in_exactly_the_modes_it_runs_in():
    """The live/sweep audit: each method runs in both modes unless ``ONLY_MODE`` names one."""
    from sgl_adaptive.bench.methods import METHODS, ONLY_MODE, live_jobs, runs_in

    base = dict(n=4, max_new_tokens=32, temperature=0.7, top_p=1.0, seed=0, anneal="paper")
    for method in METHODS:
        live = live_jobs([method], base, [0.9], [8], [1], reward_model="rm", judge_prompt="ok?")
        sweep = sweep_grid([method], 4, [0.9], [8], [1], 8, 1)
        assert bool(live) == runs_in(method, "live") and bool(sweep) == runs_in(method, "sweep"), method
        assert live or sweep, method
    assert sorted(ONLY_MODE) == ["adaptive-no-anneal", "best-of-n-anneal", "budget-matched"]


@pytest.mark.parametrize(
    ("budget", "fitted"),
    [(70, 4), (64, 3), (63, 2), (32, 2), (31, 1), (20, 1), (5, 1), (0, 1)],
)
def test_samples_within_a_token_budget_are_a_prefix_of_whole_samples(budget, fitted):
    assert samples_within([20, 12, 32, 6], budget) == fitted  # 20, 32, 64, 70 cumulative
    assert samples_within([20, 40, 1], 30) == 1  # stops at the first that does not fit


@pytest.mark.parametrize(
    ("prune_at", "keep", "spent", "fitted"), [(8, 1, 54, 2), (16, 1, 50, 2), (8, 3, 70, 4)]
)
def test_budget_matched_draws_the_samples_that_fit_in_the_tokens_pruning_spent(prune_at, keep, spent, fitted):
    pruned = prune(POOL, prune_at, keep)
    assert pruned.costs.generated_tokens == spent
    out = budget_matched(POOL, prune_at, keep)
    plain = best_of(POOL, fitted)
    assert out.matched_tokens == spent and out.candidates == list(range(fitted))
    assert (out.chosen, out.costs) == (plain.chosen, plain.costs)  # best-of-m: no pruning-point score
    assert out.costs.generated_tokens <= spent and out.costs.self_evals == fitted
    assert simulate(POOL, "budget-matched", {"n": 4, "prune_at": prune_at, "keep": keep}) == out


def test_budget_matched_draws_one_sample_even_past_the_budget():
    # pruning at 8 keeps sample 1 (0.9, complete by 8): 8 + 4 + 4 tokens; sample 0 alone is 32
    pool = Pool(
        (
            PoolSample(32, False, ((8, 0.5), (32, 0.5)), 0.0),
            PoolSample(4, True, ((4, 0.9),), 1.0),
            PoolSample(4, True, ((4, 0.8),), 1.0),
        )
    )
    out = budget_matched(pool, 8, 1)
    assert out.matched_tokens == 16 and out.candidates == [0] and out.costs.generated_tokens == 32


def random_pool(seed: int, n: int = 8, limit: int = 16, budgets: tuple[int, ...] = (4, 8)) -> Pool:
    import random

    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        finished = rng.random() < 0.6
        tokens = rng.randint(1, limit) if finished else limit
        scores = [(b, round(rng.random(), 2)) for b in budgets if b < tokens]
        samples.append(
            PoolSample(tokens, finished, (*scores, (tokens, round(rng.random(), 2))), rng.random())
        )
    return Pool(tuple(samples), prompt_tokens=10, eval_tokens=5, shape=SHAPE)


@pytest.mark.parametrize("seed", range(20))
def test_budget_matched_spends_at_most_prunings_tokens_and_picks_the_argmax_of_the_most_that_fit(seed):
    pool = random_pool(seed)
    tokens = [s.tokens for s in pool.samples]
    finals = [s.final_score for s in pool.samples]
    for prune_at in (4, 8):
        for keep in range(1, pool.n + 1):
            spent = prune(pool, prune_at, keep).costs.generated_tokens
            out = budget_matched(pool, prune_at, keep)
            m = out.costs.samples
            assert out.candidates == list(range(m)) and out.matched_tokens == spent
            assert out.costs.generated_tokens == sum(tokens[:m])
            assert sum(tokens[:m]) <= spent or m == 1  # never more, unless one sample alone exceeds it
            assert m == pool.n or sum(tokens[: m + 1]) > spent  # the largest count that fits
            assert out.chosen == max(range(m), key=lambda i: (finals[i], -i))
            assert out.quality == pool.samples[out.chosen].quality
