"""The decision rules (``sgl_adaptive.rules``) on hand-computable pools."""

from __future__ import annotations

import math

import pytest

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.errors import UserError
from sgl_adaptive.rules import (
    Selector,
    StopRule,
    argmax,
    majority_confidence,
    prune_rank,
    round_keep,
    score_weights,
    vote,
)


def test_argmax_ties_go_to_the_earliest_and_none_loses():
    assert argmax([0, 1, 2], [0.7, 0.9, 0.9]) == 1
    assert argmax([0, 1, 2], [None, 0.1, None]) == 1
    assert argmax([2, 3], [0.9, 0.9, None, None]) == 2  # all None: the first index given
    assert argmax([1, 2], {1: 0.4, 2: 0.5}) == 2


def test_prune_rank_keeps_the_best_in_draw_order():
    scores = [0.5, 0.9, None, 0.9, 0.6]
    assert prune_rank(range(5), scores, 2) == [1, 3]
    assert prune_rank(range(5), scores, 3) == [1, 3, 4]
    assert prune_rank([0, 2], scores, 1) == [0]  # a missing score ranks as -1
    assert prune_rank([3, 1], scores, 1) == [1]  # tie: the earliest drawn


def test_round_keep_is_the_keep_fraction_at_least_one():
    assert [round_keep(size, 4, 16) for size in (1, 1, 2, 4, 8)] == [1, 1, 1, 1, 2]
    assert round_keep(3, 2, 4) == 2


def test_vote_counts_ties_to_the_first_answer_and_skips_none():
    assert vote(["3", "5", "5", None]) == "5"
    assert vote(["3", "5"]) == "3"
    assert vote([None, None]) is None
    assert vote(["3", "5", "5"], [0.6, 0.3, 0.2]) == "3"  # 0.6 > 0.5
    assert vote(["3", "5", "5"], [0.4, 0.3, 0.2]) == "5"  # 0.4 < 0.5


def test_score_weights_are_a_softmax():
    w = score_weights([1.0, 0.0], 1.0)
    assert w == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)])
    assert score_weights([0.5, None], 0.1) == pytest.approx([1 / (1 + math.exp(-5)), 1 / (1 + math.exp(5))])


def test_selectors_on_one_pool():
    scores = [0.99, 0.2, 0.3, 0.25]
    answers = ["7", "9", "9", None]
    assert Selector("argmax").pick(range(4), scores, answers) == 0
    assert Selector("majority").pick(range(4), scores, answers) == 1  # "9" twice: its earliest sample
    # tau = 0.1: exp(9.9) outweighs exp(2) + exp(3); tau = 10: weights near uniform, two votes win
    assert Selector("weighted-majority", 0.1).pick(range(4), scores, answers) == 0
    assert Selector("weighted-majority", 10.0).pick(range(4), scores, answers) == 1
    assert Selector("majority").pick([0, 3], scores, answers) == 0
    assert Selector("majority").pick([3], scores, [None] * 4) == 3  # no answer: argmax fallback
    assert Selector("majority").pick([1, 2], scores, [None] * 4) == 2


def test_majority_confidence_is_the_beta_tail():
    assert majority_confidence(1, 0) == 0.75
    assert majority_confidence(3, 0) == 15 / 16
    assert majority_confidence(4, 0) == 31 / 32
    assert majority_confidence(2, 1) == 11 / 16
    assert majority_confidence(4, 1) == 57 / 64
    # against P(x > 1/2) for x ~ Beta(5, 3), integrated numerically
    a, b, steps = 5, 3, 20000
    norm = math.gamma(a + b) / (math.gamma(a) * math.gamma(b))
    xs = [0.5 + (i + 0.5) / (2 * steps) for i in range(steps)]
    tail = sum(norm * x ** (a - 1) * (1 - x) ** (b - 1) for x in xs) / (2 * steps)
    assert majority_confidence(4, 2) == pytest.approx(tail, abs=1e-6)


def test_beta_stop_needs_four_agreeing_answers_at_95_percent():
    rule = StopRule("beta", confidence=0.95)
    scores = [None] * 6
    assert not rule.should_stop(range(3), scores, ["4", "4", "4"])  # 15/16 = 0.9375
    assert rule.should_stop(range(4), scores, ["4", "4", "4", "4"])  # 31/32
    assert not rule.should_stop(range(5), scores, ["4", "4", "5", "4", "4"])  # 57/64
    assert not rule.should_stop(range(2), scores, [None, None])
    assert rule.should_stop([0, 1, 2, 4], scores, ["4", "4", "4", "5", "4"])  # only the complete ones


def test_esc_stops_when_the_last_window_agrees():
    rule = StopRule("esc", window=3)
    scores = [None] * 5
    assert rule.should_stop(range(4), scores, ["1", "2", "2", "2"])
    assert not rule.should_stop(range(4), scores, ["2", "2", "1", "2"])
    assert not rule.should_stop(range(2), scores, ["2", "2"])  # fewer than a window
    assert not rule.should_stop(range(3), scores, [None, None, None])


def test_threshold_stop_reads_the_best_complete_score():
    rule = StopRule("threshold", threshold=0.9)
    assert rule.should_stop([0, 1], [0.5, 0.95, 0.99], [None] * 3)
    assert not rule.should_stop([0, 2], [0.5, 0.95, None], [None] * 3)
    assert not StopRule("threshold", threshold=1.0).should_stop([0], [1.0], [None])


def test_unknown_names_are_one_line_errors_listing_the_choices():
    with pytest.raises(UserError, match="unknown selector 'best'; choose one of argmax, majority, weighted"):
        MethodConfig(selector="best")
    with pytest.raises(UserError, match="unknown stop rule 'never'; choose one of threshold, beta, esc"):
        MethodConfig(stop="never")
    with pytest.raises(UserError, match="--stop-window"):
        MethodConfig(stop_window=0)
    with pytest.raises(ValueError, match="unknown selector"):
        Selector("best")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--selector", "best"], ["unknown selector 'best'", "argmax, majority, weighted-majority"]),
        (["--stop", "never"], ["unknown stop rule 'never'", "threshold, beta, esc"]),
        (["--method", "best-of-n", "--stop", "beta"], ["--stop is not used by best-of-n"]),
        (["--stop-confidence", "1.5"], ["--stop-confidence must be within (0, 1)"]),
        (
            ["--stop", "beta", "--stop-window", "3"],
            ["--stop-window is read only by --stop esc", "--stop beta"],
        ),
        (["--stop", "esc", "--threshold", "0.5"], ["--threshold is read only by --stop threshold"]),
        (["--vote-temperature", "0.5"], ["--vote-temperature is read only by --selector weighted-majority"]),
        (["--stop", "esc", "--stop-warmup", "3"], ["--stop-warmup is read only by --stop deepconf"]),
        (["--stop", "deepconf", "--stop-percentile", "120"], ["--stop-percentile must be within [0, 100]"]),
        (["--method", "best-of-n", "--stop-warmup", "2"], ["--stop-warmup is not used by best-of-n"]),
    ],
)
def test_the_cli_refuses_unknown_rules_in_one_line(args, needles):
    from typer.testing import CliRunner

    from sgl_adaptive.cli import app

    res = CliRunner().invoke(app, ["run", "What is 2 + 3?", *args], env={"COLUMNS": "300"})
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert all(n in lines[0] for n in needles), res.output


def test_random_pruning_is_seeded_sized_and_in_draw_order():
    from sgl_adaptive.rules import pruned_keep, random_rank

    picks = [random_rank(range(8), 3, seed) for seed in range(20)]
    assert all(len(p) == 3 and p == sorted(p) and set(p) <= set(range(8)) for p in picks)
    assert picks == [random_rank(range(8), 3, seed) for seed in range(20)]  # deterministic
    assert len({tuple(p) for p in picks}) > 5  # and not one fixed choice
    assert random_rank([4, 5], 3, 0) == [4, 5]
    scores = [0.1, 0.9, 0.5]
    assert pruned_keep(range(3), scores, 1) == [1]
    assert pruned_keep(range(3), scores, 1, "random", 7) == random_rank(range(3), 1, 7)
    with pytest.raises(ValueError, match="unknown pruning rule 'loudest'"):
        pruned_keep(range(3), scores, 1, "loudest")


def test_percentile_interpolates_like_numpy():
    from sgl_adaptive.rules import percentile

    assert percentile([0.1, 0.4, 0.2, 0.3], 0) == 0.1
    assert percentile([0.1, 0.4, 0.2, 0.3], 100) == 0.4
    assert percentile([0.1, 0.4, 0.2, 0.3], 50) == pytest.approx(0.25)
    assert percentile([0.1, 0.4, 0.2, 0.3], 90) == pytest.approx(0.37)  # rank 2.7: 0.3 + 0.7 * 0.1
    assert percentile([0.5], 90) == 0.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_deepconf_stop_sets_its_threshold_from_the_warm_up():
    rule = StopRule("deepconf", warmup=4, percentile=90.0)
    warm = [0.1, 0.4, 0.2, 0.3]  # the 90th percentile is 0.37
    answers = [None] * 8
    assert not rule.should_stop(range(4), warm, answers)  # only the warm-up: never stops
    assert not rule.should_stop(range(6), [*warm, 0.36, 0.2], answers)  # below 0.37
    assert rule.should_stop(range(6), [*warm, 0.36, 0.38], answers)
    assert rule.should_stop(range(5), [*warm, 0.37], answers)  # reaching it is enough
    # the warm-up is the first four complete samples (sample 1 is not complete): 0.1 0.2 0.3 0.4, bar 0.37
    pool = [0.1, 0.99, 0.2, 0.3, 0.4, 0.35, 0.45]
    assert not rule.should_stop([0, 2, 3, 4, 5], pool, answers)
    assert rule.should_stop([0, 2, 3, 4, 6], pool, answers)  # with sample 1 in the warm-up the bar is 0.78
    assert not rule.should_stop(range(7), pool, answers)
    # percentile 0: the bar is the warm-up's lowest score
    low = StopRule("deepconf", warmup=2, percentile=0.0)
    assert low.should_stop(range(3), [0.5, 0.2, 0.2], answers)
    assert not low.should_stop(range(3), [0.5, 0.2, 0.1], answers)
    assert low.needs_scores and StopRule("threshold").needs_scores and not StopRule("beta").needs_scores


def test_deepconf_options_belong_to_the_deepconf_stop():
    config = MethodConfig(stop="deepconf", stop_warmup=2, stop_percentile=50.0)
    assert config.stop_rule() == StopRule("deepconf", 0.98, 0.95, 4, 2, 50.0)
    with pytest.raises(UserError, match="--stop-warmup must be at least 1"):
        MethodConfig(stop_warmup=0)
    with pytest.raises(UserError, match=r"--stop-percentile must be within \[0, 100\]"):
        MethodConfig(stop_percentile=101.0)
    from sgl_adaptive.config import check_options_used

    with pytest.raises(UserError, match="--stop-warmup is read only by --stop deepconf"):
        check_options_used("adaptive", {"stop_warmup"}, MethodConfig(stop="esc"))
    with pytest.raises(UserError, match="--stop-percentile is not used by best-of-n"):
        check_options_used("best-of-n", {"stop_percentile"})
    check_options_used("adaptive-prune", {"stop_warmup", "stop_percentile"}, config)


def test_the_sweep_reads_the_deepconf_fields():
    from sgl_adaptive.bench.sweep import rules_of

    stop, _ = rules_of({"stop": "deepconf", "stop_warmup": 3, "stop_percentile": 25.0})
    assert (stop.kind, stop.warmup, stop.percentile) == ("deepconf", 3, 25.0)


def test_score_allocation_feeds_the_lowest_best_score():
    from sgl_adaptive.rules import allocate

    prompts = [([0.9, 0.2], [None, None]), ([0.3], [None]), ([None], [None]), ([0.3, 0.1], [None, None])]
    # need: 0.9, 0.3, -1 (no score), 0.3 (tie with prompt 1: fewer samples first)
    assert allocate("score", prompts, 4) == [2, 1, 3, 0]
    assert allocate("score", prompts, 2) == [2, 1]
    assert allocate("score", prompts, 2, eligible=[0, 3]) == [3, 0]
    assert allocate("score", prompts, 0) == []


def test_agreement_allocation_feeds_the_least_agreeing_answers():
    from sgl_adaptive.rules import allocate, allocation_need

    split = ([None, None], ["3", "4"])  # 1-1: 0.5
    single = ([None], ["3"])  # 0.75
    agreeing = ([None, None], ["5", "5"])  # 7/8
    unanswered = ([None, None], [None, None])  # no votes: 0.5, like a split
    assert [allocation_need("agreement", *p) for p in (split, single, agreeing, unanswered)] == [
        0.5,
        0.75,
        0.875,
        0.5,
    ]
    assert allocate("agreement", [agreeing, single, split, unanswered], 3) == [2, 3, 1]
    three = ([None] * 3, ["5", "5", "5"])  # 15/16: more agreeing samples are surer
    assert allocate("agreement", [three, agreeing], 1) == [1]


def test_even_allocation_is_round_robin():
    from sgl_adaptive.rules import allocate

    prompts = [([0.1, 0.2], ["1", "2"]), ([0.9], ["1"]), ([0.5], ["1"])]
    assert allocate("even", prompts, 2) == [1, 2]
    assert allocate("even", prompts, 3) == [1, 2, 0]
    with pytest.raises(
        ValueError, match="unknown allocation 'loudest'; choose one of score, agreement, even"
    ):
        allocate("loudest", prompts, 1)


@pytest.mark.parametrize("percentile", [0.0, 50.0, 100.0])
def test_the_adaptive_program_stops_where_the_deepconf_rule_says(backend, percentile):
    """The program reads the stop rule through ``MethodConfig.stop_rule``: replayed on its own samples, the
    rule holds after the last round only (or never, when the whole budget was drawn)."""
    from sgl_adaptive import run
    from sgl_adaptive.rules import deepconf_should_stop
    from sgl_adaptive.schedules import batch_sizes

    config = MethodConfig(
        n=8, max_new_tokens=6, temperature=1.0, stop="deepconf", stop_warmup=2, stop_percentile=percentile
    )
    result = run("What is 2 + 3?", backend, "adaptive", config)
    scores = [c.score for c in result.candidates]
    assert all(s is not None for s in scores)
    ends = [sum(batch_sizes(8)[: r + 1]) for r in range(len(batch_sizes(8)))]
    drawn = len(scores)
    assert drawn in ends
    for end in ends[: ends.index(drawn)]:
        assert not deepconf_should_stop(scores[:end], 2, percentile)
    assert deepconf_should_stop(scores, 2, percentile) or drawn == 8
    if percentile == 0.0:
        assert drawn < 8  # a later sample at least as good as the worse of the two warm-up ones
