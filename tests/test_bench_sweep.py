"""Sweep simulations on a hand-made pool: selection, stopping, pruning, costs and the paper's metric."""

from __future__ import annotations

import pytest

from sgl_adaptive.bench.sweep import (
    Pool,
    PoolSample,
    adaptive,
    adaptive_prune,
    best_of,
    greedy,
    majority,
    oracle,
    percent_of_max,
    prune,
    sample_counts,
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
    assert rm.costs.self_evals == 0 and rm.rm_tokens == 146
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
    grid = sweep_grid(methods, 4, [0.9, 1.0], [8, 16], [1, 2], 8, 1)
    assert sample_counts(4) == [1, 2, 4] and sample_counts(5) == [1, 2, 4, 5]
    assert len(grid) == 1 + 5 * 3 + 2 + 4 + 2
    for method, config in grid:
        out = simulate(POOL, method, config)
        assert 0 <= out.chosen < 4 and out.costs.flops > 0


def test_average_samples_and_accuracy_at_a_threshold_over_questions():
    easy = Pool((PoolSample(5, True, ((5, 0.97),), 1.0), PoolSample(5, True, ((5, 0.5),), 0.0)))
    runs = [adaptive(pool, 0.9) for pool in (POOL, easy)]
    assert sum(r.costs.samples for r in runs) / 2 == 1.5  # 2 samples, then 1
    assert sum(r.quality for r in runs) / 2 == 1.0
    assert sum(r.costs.batches for r in runs) / 2 == 1.5
