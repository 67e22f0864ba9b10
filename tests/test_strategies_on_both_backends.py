"""Every strategy runs on both backends and decides as the library's rules say.

Each strategy (method x scorer x selector x stop rule) runs on the in-process backend and through
``SGLangEndpoint`` (SGLang's HTTP API, answered by the in-process engine: ``http_server.serve``). The
endpoint's samples are not seeded, so the two runs draw different samples; instead each run is replayed
by the offline sweep on a pool made of the run's own samples, in its draw order, and the replay must
make the same pick and count the same samples, batches, generated tokens, evaluations and critical path.
The sweep takes every decision from ``sgl_adaptive.rules``, so this checks each program against the
rules on both backends (``test_rules_agreement.py`` checks program and sweep on one shared seeded pool).

Final answers are replaced by a function of the text length (the tiny model writes no numbers), so
the votes and the answer-agreement stop rules have something to count.
"""

from __future__ import annotations

import dataclasses

import pytest

from sgl_adaptive import MethodConfig, run
from sgl_adaptive.backends.endpoint import SGLangEndpoint
from sgl_adaptive.backends.http_server import serve
from sgl_adaptive.bench.sweep import Pool, PoolSample, adaptive, adaptive_prune, best_of, prune
from sgl_adaptive.result import Result
from sgl_adaptive.scorers import TRAINING_FREE

PROMPT = "What is 2 + 3?"
BASE = MethodConfig(n=6, max_new_tokens=12, prune_at=5, keep=2, temperature=1.0, seed=5)


def fake_answer(text: str) -> str | None:
    return str(len(text) % 3)


@pytest.fixture(autouse=True)
def _answers_by_length(monkeypatch):
    monkeypatch.setattr("sgl_adaptive.programs.common.extract_number", fake_answer)


@pytest.fixture(scope="module")
def endpoint(backend):
    server = serve(backend, port=0)
    yield SGLangEndpoint(f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()


@pytest.fixture(params=["local", "endpoint"])
def either_backend(request, backend):
    return backend if request.param == "local" else request.getfixturevalue("endpoint")


def own_pool(result: Result, scorer: str) -> Pool:
    """The run's own samples as a sweep pool, in draw order, with the scores the run read."""
    return Pool(
        tuple(
            PoolSample(
                tokens=c.tokens,
                finished=c.finished,
                scores=tuple(tuple(s) for s in c.scores),
                quality=0.0,
                answer=fake_answer(c.text),
                temperature=c.temperature,
            )
            for c in result.candidates
        ),
        scorer=scorer,
    )


def same_decisions(live: Result, replay) -> None:
    assert live.best == replay.chosen
    assert replay.candidates == list(range(len(live.candidates)))
    fields = ("samples", "batches", "generated_tokens", "self_evals", "critical_path_tokens")
    assert {f: getattr(live.costs, f) for f in fields} == {f: getattr(replay.costs, f) for f in fields}


SELECTIONS = [
    dict(scorer="self-eval", selector="argmax"),
    dict(scorer="self-eval", selector="majority"),
    dict(scorer="self-eval", selector="weighted-majority", vote_temperature=0.05),
    dict(scorer="confidence", selector="argmax", confidence_window=4),
    dict(scorer="self-certainty", selector="argmax"),
    dict(scorer="confidence", selector="weighted-majority", confidence_window=4, vote_temperature=1.0),
]


@pytest.mark.parametrize("rules", SELECTIONS, ids=lambda r: f"{r['scorer']}-{r['selector']}")
def test_best_of_n_picks_by_its_rules_on_both_backends(either_backend, rules):
    config = dataclasses.replace(BASE, **rules)
    live = run(PROMPT, either_backend, "best-of-n", config)
    assert len(live.candidates) == config.n
    if config.selector != "majority":
        assert all(c.score is not None for c in live.candidates)
    replay = best_of(own_pool(live, config.scorer), config.n, selector=config.selector_rule())
    assert live.best == replay.chosen
    assert live.costs.samples == replay.costs.samples == config.n
    evaluated = config.scorer not in TRAINING_FREE and config.selector != "majority"
    assert live.costs.self_evals == (config.n if evaluated else 0)


STOPS = [
    dict(stop="threshold", threshold=0.0),
    dict(stop="threshold", threshold=1.0),
    dict(stop="beta", selector="majority", stop_confidence=0.8),
    dict(stop="esc", selector="majority", stop_window=2),
    dict(stop="deepconf", stop_warmup=2, stop_percentile=50.0),
    dict(stop="deepconf", scorer="confidence", confidence_window=4, stop_warmup=2, stop_percentile=0.0),
]


@pytest.mark.parametrize("rules", STOPS, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_adaptive_sampling_stops_by_its_rules_on_both_backends(either_backend, rules):
    config = dataclasses.replace(BASE, **rules)
    live = run(PROMPT, either_backend, "adaptive", config)
    replay = adaptive(
        own_pool(live, config.scorer), config.threshold, config.stop_rule(), config.selector_rule()
    )
    same_decisions(live, replay)
    if config.stop == "threshold":  # 0 stops after the first sample; 1 never stops early
        assert live.costs.samples == (1 if config.threshold == 0.0 else config.n)


PRUNING = [dict(), dict(selector="majority"), dict(prune_by="random")]


@pytest.mark.parametrize("rules", PRUNING, ids=lambda r: "-".join(r.values()) or "score")
def test_early_pruning_keeps_by_its_rules_on_both_backends(either_backend, rules):
    config = dataclasses.replace(BASE, **rules)
    live = run(PROMPT, either_backend, "prune", config)
    assert len(live.candidates) == config.n
    replay = prune(
        own_pool(live, config.scorer),
        config.prune_at,
        config.keep,
        config.selector_rule(),
        config.prune_by,
        config.seed,
    )
    same_decisions(live, replay)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_adaptive_pruning_by_its_rules_on_both_backends(either_backend, threshold):
    config = dataclasses.replace(BASE, threshold=threshold)
    live = run(PROMPT, either_backend, "adaptive-prune", config)
    replay = adaptive_prune(
        own_pool(live, config.scorer),
        config.threshold,
        config.prune_at,
        config.keep,
        config.stop_rule(),
        config.selector_rule(),
        config.prune_by,
        config.seed,
    )
    same_decisions(live, replay)
