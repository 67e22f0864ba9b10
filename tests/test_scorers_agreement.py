"""The programs and the offline sweep agree under a training-free scorer, as under self-evaluation
(``test_rules_agreement.py``): a pool drawn with ``scorer=confidence`` holds the confidence at each
budget; the sweep replays a method on it with the scorer chosen by its configuration and counts no
evaluation; the program runs live. Same samples, batches, picks and costs."""

from __future__ import annotations

import dataclasses

import pytest

from sgl_adaptive import MethodConfig, run
from sgl_adaptive.bench.sweep import Pool, PoolSample, simulate
from sgl_adaptive.programs import sample_pool
from sgl_adaptive.result import Result
from sgl_adaptive.runner import run_program

PROMPT = "What is 2 + 3?"
BASE = MethodConfig(
    n=8,
    max_new_tokens=16,
    prune_at=6,
    keep=2,
    temperature=1.0,
    seed=3,
    scorer="confidence",
    confidence_window=1,  # the lowest token: on the tiny model, picks other than the first sample
)


def fake_answer(text: str) -> str | None:
    return str(len(text) % 3)


@pytest.fixture(autouse=True)
def _answers_by_length(monkeypatch):
    monkeypatch.setattr("sgl_adaptive.programs.common.extract_number", fake_answer)


def draw_pool(backend, config: MethodConfig, budgets: tuple[int, ...]) -> Result:
    run_program(
        sample_pool, PROMPT, backend, config, name="pool", budgets=budgets
    )  # see test_rules_agreement
    return run_program(sample_pool, PROMPT, backend, config, name="pool", budgets=budgets)


def as_pool(result: Result, order: list[int] | None = None) -> Pool:
    """A sweep pool with the drawn confidence as ``free_scores`` and no self-evaluation."""
    order = order if order is not None else list(range(len(result.candidates)))
    samples = []
    for c in (result.candidates[i] for i in order):
        samples.append(
            PoolSample(
                tokens=c.tokens,
                finished=c.finished,
                scores=(),
                quality=0.0,
                answer=fake_answer(c.text),
                temperature=c.temperature,
                free_scores={"confidence": tuple(c.scores)},
            )
        )
    return Pool(tuple(samples))


def sweep_config(config: MethodConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "selfeval"}


def same_costs(live: Result, sweep) -> None:
    fields = ("samples", "batches", "generated_tokens", "self_evals", "critical_path_tokens")
    assert {f: getattr(live.costs, f) for f in fields} == {f: getattr(sweep.costs, f) for f in fields}
    assert live.costs.self_evals == 0


@pytest.mark.parametrize(
    "rules",
    [
        dict(stop="esc", stop_window=2),
        dict(stop="beta", stop_confidence=0.9, selector="weighted-majority", vote_temperature=1.0),
        dict(stop="deepconf", stop_warmup=2, stop_percentile=50.0),
    ],
    ids=lambda r: r["stop"],
)
def test_adaptive_program_and_sweep_agree_on_the_confidence(backend, rules):
    config = dataclasses.replace(BASE, **rules)
    pooled = draw_pool(backend, dataclasses.replace(config, anneal_best_of_n=True), budgets=())
    assert pooled.costs.self_evals == 0 and all(c.score is not None for c in pooled.candidates)
    sweep = simulate(as_pool(pooled), "adaptive", sweep_config(config))
    live = run(PROMPT, backend, "adaptive", config)
    drawn = len(live.candidates)
    assert [c.text for c in live.candidates] == [c.text for c in pooled.candidates[:drawn]]
    assert [c.score for c in live.candidates] == pytest.approx([c.score for c in pooled.candidates[:drawn]])
    assert sweep.candidates == list(range(drawn))
    assert live.best == sweep.chosen
    same_costs(live, sweep)


def test_pruning_program_and_sweep_agree_on_the_confidence_of_the_prefix(backend):
    config = dataclasses.replace(BASE, n=6)
    pooled = draw_pool(backend, config, budgets=(config.prune_at,))
    live = run(PROMPT, backend, "prune", config)
    order = []  # one temperature for all forks: the same samples, not in the same order
    for c in live.candidates:
        matches = [i for i, p in enumerate(pooled.candidates) if p.text.startswith(c.text)]
        assert len(matches) == 1
        order += matches
    sweep = simulate(as_pool(pooled, order), "prune", sweep_config(config))
    assert live.best == sweep.chosen
    same_costs(live, sweep)


def test_a_pool_without_the_scorer_is_refused():
    pool = Pool((PoolSample(tokens=3, finished=True, scores=((3, 0.5),), quality=1.0),))
    with pytest.raises(ValueError, match="the pool has no confidence scores"):
        simulate(pool, "best-of-n", {"n": 1, "scorer": "confidence"})
    with pytest.raises(ValueError, match="unknown scorer 'x'"):
        simulate(pool, "best-of-n", {"n": 1, "scorer": "x"})
    assert simulate(pool, "best-of-n", {"n": 1}).costs.self_evals == 1
