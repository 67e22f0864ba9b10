import pytest

from sgl_adaptive.schedules import Annealing, ThresholdStop, batch_sizes


@pytest.mark.parametrize(
    ("budget", "sizes"),
    [
        (1, [1]),
        (2, [1, 1]),
        (4, [1, 1, 2]),
        (5, [1, 1, 2, 1]),
        (16, [1, 1, 2, 4, 8]),
        (20, [1, 1, 2, 4, 8, 4]),
    ],
)
def test_batch_sizes_double_and_are_capped_at_the_budget(budget, sizes):
    assert batch_sizes(budget) == sizes
    assert sum(batch_sizes(budget)) == budget


def test_batch_sizes_reject_an_empty_budget():
    with pytest.raises(ValueError):
        batch_sizes(0)


def test_paper_annealing_starts_greedy_and_approaches_t():
    anneal = Annealing(0.8)
    assert [anneal(k) for k in range(4)] == pytest.approx([0.0, 0.4, 0.6, 0.7])
    assert anneal(30) == pytest.approx(0.8)
    assert Annealing(0.8, "none")(0) == 0.8


def test_threshold_rule():
    assert ThresholdStop(0.0).should_stop(0.0)
    assert ThresholdStop(0.9).should_stop(0.95)
    assert not ThresholdStop(0.9).should_stop(0.85)
    assert not ThresholdStop(0.9).should_stop(None)
    assert not ThresholdStop(1.0).should_stop(1.0)  # 1.0 = never stop early
