"""The programs and the offline sweep make the same decisions on the same seeded samples.

A scored pool is drawn with ``sample_pool`` (the same requests, hence on the in-process backend the same
seeded samples, as the method's own program draws); the sweep replays the method on it; the program
then runs live. Both must draw the same samples in the same batches, prune the same ones, pick the same
one and count the same samples, batches, generated tokens, evaluations and critical path.

Final answers are replaced by a function of the text length (the tiny model writes no numbers), so
the voting selectors and the answer-agreement stop rules have votes to count.
"""

from __future__ import annotations

import dataclasses

import pytest

from sgl_adaptive import MethodConfig, run
from sgl_adaptive.bench.sweep import Pool, PoolSample, adaptive, adaptive_prune, prune
from sgl_adaptive.programs import sample_pool
from sgl_adaptive.result import Result
from sgl_adaptive.runner import run_program

PROMPT = "What is 2 + 3?"
BASE = MethodConfig(n=8, max_new_tokens=16, prune_at=6, keep=2, temperature=1.0, seed=3)


def fake_answer(text: str) -> str | None:
    return str(len(text) % 3)


@pytest.fixture(autouse=True)
def _answers_by_length(monkeypatch):
    monkeypatch.setattr("sgl_adaptive.programs.common.extract_number", fake_answer)


def draw_pool(backend, config: MethodConfig, budgets: tuple[int, ...]) -> Result:
    """The pool: every sample scored at each budget, by the same requests the method's program sends."""
    return run_program(sample_pool, PROMPT, backend, config, name="pool", budgets=budgets)


def as_pool(result: Result, order: list[int] | None = None) -> Pool:
    """A sweep pool of the drawn candidates (in ``order``: pool index -> candidate)."""
    order = order if order is not None else list(range(len(result.candidates)))
    return Pool(
        tuple(
            PoolSample(
                tokens=c.tokens,
                finished=c.finished,
                scores=tuple(c.scores),
                quality=0.0,
                answer=fake_answer(c.text),
                temperature=c.temperature,
            )
            for c in (result.candidates[i] for i in order)
        )
    )


def same_costs(live: Result, sweep) -> None:
    fields = ("samples", "batches", "generated_tokens", "self_evals", "critical_path_tokens")
    assert {f: getattr(live.costs, f) for f in fields} == {f: getattr(sweep.costs, f) for f in fields}


RULES = [
    dict(selector="argmax", stop="threshold"),
    dict(selector="weighted-majority", stop="threshold"),
    dict(selector="majority", stop="beta", stop_confidence=0.7),
    dict(selector="majority", stop="esc", stop_window=2),
    dict(selector="weighted-majority", vote_temperature=1.0, stop="esc", stop_window=2),
    dict(selector="argmax", stop="deepconf", stop_warmup=2, stop_percentile=50.0),
    dict(selector="majority", stop="deepconf", stop_warmup=1, stop_percentile=0.0),
]


@pytest.mark.parametrize("rules", RULES, ids=lambda r: f"{r['selector']}-{r['stop']}")
def test_adaptive_sampling_program_and_sweep_agree(backend, rules):
    pooled = draw_pool(backend, dataclasses.replace(BASE, anneal_best_of_n=True), budgets=())
    finals = [c.score for c in pooled.candidates]
    thresholds = [0.0, max(finals[:4]) - 1e-6, 1.0] if rules["stop"] == "threshold" else [1.0]
    for threshold in thresholds:
        config = dataclasses.replace(BASE, threshold=threshold, **rules)
        sweep = adaptive(as_pool(pooled), threshold, config.stop_rule(), config.selector_rule())
        live = run(PROMPT, backend, "adaptive", config)
        drawn = len(live.candidates)
        assert [c.text for c in live.candidates] == [c.text for c in pooled.candidates[:drawn]]
        assert sweep.candidates == list(range(drawn))
        assert live.best == sweep.chosen, (threshold, rules)
        same_costs(live, sweep)


def test_the_thresholds_above_stop_at_different_rounds(backend):
    """Guards the test above: the pool's thresholds do stop the program early and late."""
    pooled = draw_pool(backend, dataclasses.replace(BASE, anneal_best_of_n=True), budgets=())
    finals = [c.score for c in pooled.candidates]
    early = run(PROMPT, backend, "adaptive", dataclasses.replace(BASE, threshold=0.0))
    mid = run(PROMPT, backend, "adaptive", dataclasses.replace(BASE, threshold=max(finals[:4]) - 1e-6))
    assert early.costs.samples == 1 and mid.costs.samples <= 4 and mid.costs.samples < 8


PRUNING_RULES = [
    dict(selector="argmax"),
    dict(selector="majority"),
    dict(selector="weighted-majority"),
    dict(selector="argmax", prune_by="random"),
]


@pytest.mark.parametrize("rules", PRUNING_RULES, ids=lambda r: "-".join(r.values()))
def test_early_pruning_program_and_sweep_agree(backend, rules):
    config = dataclasses.replace(BASE, n=6, **rules)
    pooled = draw_pool(backend, config, budgets=(config.prune_at,))
    live = run(PROMPT, backend, "prune", config)
    # all forks share one temperature: the seeded samples are the same set, not in the same order
    order = []
    for c in live.candidates:
        matches = [i for i, p in enumerate(pooled.candidates) if p.text.startswith(c.text)]
        assert len(matches) == 1
        order += matches
    pool = as_pool(pooled, order)
    sweep = prune(pool, config.prune_at, config.keep, config.selector_rule(), config.prune_by, config.seed)
    assert live.best == sweep.chosen
    assert all(c.pruned == (not c.finished and c.tokens < config.max_new_tokens) for c in live.candidates)
    assert sum(not c.pruned for c in live.candidates) >= config.keep  # the kept, and any finished early
    same_costs(live, sweep)


@pytest.mark.parametrize(
    "rules", [*RULES[:3], dict(selector="argmax", stop="threshold", prune_by="random")], ids=str
)
def test_adaptive_pruning_program_and_sweep_agree(backend, rules):
    pooled = draw_pool(backend, dataclasses.replace(BASE, anneal_best_of_n=True), budgets=(BASE.prune_at,))
    for threshold in (0.0, 1.0):
        config = dataclasses.replace(BASE, threshold=threshold, **rules)
        sweep = adaptive_prune(
            as_pool(pooled),
            threshold,
            config.prune_at,
            config.keep,
            config.stop_rule(),
            config.selector_rule(),
            config.prune_by,
            config.seed,
        )
        live = run(PROMPT, backend, "adaptive-prune", config)
        drawn = len(live.candidates)
        assert sweep.candidates == list(range(drawn))
        for c, p in zip(live.candidates, pooled.candidates, strict=False):
            assert p.text.startswith(c.text)
        assert live.best == sweep.chosen, (threshold, rules)
        same_costs(live, sweep)
