"""The training-free scorers: hand-computed scores, the backends' top-k log-probabilities, the programs'
use of them (no self-evaluation) and the command line's errors."""

from __future__ import annotations

import math

import pytest
import requests
from sglang.lang.ir import SglSamplingParams
from typer.testing import CliRunner

from sgl_adaptive import MethodConfig, run
from sgl_adaptive.backends.endpoint import SGLangEndpoint
from sgl_adaptive.backends.http_server import serve
from sgl_adaptive.cli import app
from sgl_adaptive.errors import UserError
from sgl_adaptive.scorers import (
    SCORERS,
    Scorer,
    confidence_score,
    lowest_window_mean,
    self_certainty_score,
    token_confidences,
)

PROMPT = "What is 2 + 3?"
SMALL = dict(max_new_tokens=12, temperature=1.0)


def top(*logprobs: float) -> list[tuple[float, int, None]]:
    """One token's top-k entries, as the backends return them without text."""
    return [(lp, i, None) for i, lp in enumerate(logprobs)]


# ---- the formulas, by hand ---------------------------------------------------------------------------
TOKENS = [top(-0.5, -1.5), top(-1.0, -3.0), top(-0.25, -0.75), top(-2.0, -4.0)]
"""Token confidences 1.0, 2.0, 0.5, 3.0."""


def test_token_confidence_is_minus_the_mean_top_k_logprob():
    assert token_confidences(TOKENS) == pytest.approx([1.0, 2.0, 0.5, 3.0])


def test_confidence_is_the_lowest_sliding_window_mean():
    # windows of 2: (1 + 2) / 2 = 1.5, (2 + 0.5) / 2 = 1.25, (0.5 + 3) / 2 = 1.75
    assert confidence_score(TOKENS, window=2) == pytest.approx(1.25)
    assert confidence_score(TOKENS, window=3) == pytest.approx(min(3.5 / 3, 5.5 / 3))
    assert confidence_score(TOKENS, window=64) == pytest.approx(6.5 / 4)  # shorter than a window: the mean
    assert confidence_score(TOKENS, window=1) == pytest.approx(0.5)
    assert confidence_score([], window=4) is None
    assert lowest_window_mean([5.0, 1.0, 1.0, 5.0, 0.0], 2) == pytest.approx(1.0)


def test_self_certainty_is_the_mean_kl_from_uniform_on_the_top_k():
    def kl_uniform(logprobs: list[float]) -> float:
        k = len(logprobs)
        return sum((1 / k) * math.log((1 / k) / math.exp(lp)) for lp in logprobs)

    expected = sum(kl_uniform([e[0] for e in t]) for t in TOKENS) / len(TOKENS)
    assert self_certainty_score(TOKENS) == pytest.approx(expected)
    assert self_certainty_score(TOKENS) == pytest.approx(6.5 / 4 - math.log(2))
    assert self_certainty_score([top(math.log(0.5), math.log(0.5))]) == pytest.approx(0.0)  # uniform: 0
    assert self_certainty_score([]) is None


def test_an_underflowed_logprob_counts_as_the_floor():
    # an SGLang server clamps log(0) to the float minimum
    assert token_confidences([top(-1.0, -3.4e38)]) == pytest.approx([50.5])
    assert math.isfinite(self_certainty_score([top(-1.0, -3.4e38)]))


def test_json_entries_score_like_tuples():
    as_json = [[list(e) for e in t] for t in TOKENS]
    assert confidence_score(as_json, 2) == confidence_score(TOKENS, 2)


def test_the_scorer_rule_and_its_names():
    assert Scorer("confidence", window=2).score(TOKENS) == pytest.approx(1.25)
    assert Scorer("self-certainty").score(TOKENS) == pytest.approx(6.5 / 4 - math.log(2))
    assert not Scorer().training_free and Scorer("confidence").training_free
    assert Scorer().evaluated and Scorer("judge").evaluated and not Scorer("rm").evaluated
    assert [k for k in SCORERS if Scorer(k).calibrated] == ["self-eval", "judge"]
    with pytest.raises(ValueError, match="unknown scorer 'bogus'; choose one of self-eval, confidence"):
        Scorer("bogus")
    for kind in ("self-eval", "judge", "rm"):
        with pytest.raises(
            ValueError, match=f"the {kind} score does not come from the sample's log-probabilities"
        ):
            Scorer(kind).score(TOKENS)


# ---- configuration and command line ------------------------------------------------------------------
def test_config_refuses_unknown_scorers_and_an_uncalibrated_threshold():
    with pytest.raises(UserError, match="unknown scorer 'conf'; choose one of " + ", ".join(SCORERS)):
        MethodConfig(scorer="conf")
    with pytest.raises(UserError, match="--confidence-window must be at least 1"):
        MethodConfig(confidence_window=0)
    with pytest.raises(UserError, match="--stop threshold needs a calibrated score"):
        MethodConfig(scorer="confidence").check_for("adaptive")
    with pytest.raises(UserError, match="--stop threshold needs a calibrated score"):
        MethodConfig(scorer="self-certainty", stop="threshold").check_for("adaptive-prune")
    MethodConfig(scorer="confidence").check_for("best-of-n")
    MethodConfig(scorer="confidence").check_for("prune")
    MethodConfig(scorer="confidence", stop="beta").check_for("adaptive")


def invoke(*args: str):
    return CliRunner().invoke(app, ["run", PROMPT, *args])


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--scorer", "bogus"],
            "unknown scorer 'bogus'; choose one of self-eval, confidence, self-certainty",
        ),
        (["--scorer", "confidence"], "--stop threshold needs a calibrated score in [0, 1]"),
        (
            ["--method", "best-of-n", "--confidence-window", "8"],
            "--confidence-window is read only by --scorer",
        ),
        (["--method", "greedy", "--scorer", "confidence"], "--scorer is not used by greedy"),
    ],
)
def test_cli_scorer_errors_are_one_line(args, message):
    res = invoke(*args)
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert message in text and "Traceback" not in res.output


# ---- the backends ----------------------------------------------------------------------------------
def sampling(**kwargs) -> SglSamplingParams:
    return SglSamplingParams(max_new_tokens=5, temperature=0.0, **kwargs)


def test_both_backends_return_top_k_logprobs_in_the_same_shape(backend):
    text = backend.chat_template.role_prefix_and_suffix["user"][0] + PROMPT
    asked = dict(return_logprob=True, top_logprobs_num=4, return_text_in_logprobs=False)
    _, local = backend.complete(text, sampling(**asked))
    server = serve(backend, port=0)
    try:
        body = {
            "text": text,
            "sampling_params": {"max_new_tokens": 5, "temperature": 0.0},
            **asked,
        }
        url = f"http://127.0.0.1:{server.server_address[1]}/generate"
        remote = requests.post(url, json=body, timeout=60).json()["meta_info"]
    finally:
        server.shutdown()
    tops = local["output_top_logprobs"]
    assert len(tops) == local["completion_tokens"] and all(len(t) == 4 for t in tops)
    assert all(
        isinstance(lp, float) and isinstance(i, int) and piece is None for t in tops for lp, i, piece in t
    )
    assert all([lp for lp, _, _ in t] == sorted((lp for lp, _, _ in t), reverse=True) for t in tops)
    assert remote["output_top_logprobs"] == [[list(e) for e in t] for t in tops]
    _, with_text = backend.complete(text, sampling(return_logprob=True, top_logprobs_num=2))
    assert all(isinstance(piece, str) for t in with_text["output_top_logprobs"] for _, _, piece in t)


# ---- the programs ----------------------------------------------------------------------------------
@pytest.fixture()
def recorded(backend, monkeypatch):
    """Every request the programs send to the in-process backend: (sampling params, meta_info)."""
    seen: list[tuple[SglSamplingParams, dict]] = []
    complete = backend.complete

    def spy(text, sp, token_ids_logprob=None):
        out, meta = complete(text, sp, token_ids_logprob)
        seen.append((sp, meta))
        return out, meta

    monkeypatch.setattr(backend, "complete", spy)
    return seen


@pytest.mark.parametrize("scorer", ["confidence", "self-certainty"])
def test_best_of_n_with_a_training_free_scorer_sends_no_evaluation(backend, recorded, scorer):
    r = run(PROMPT, backend, "best-of-n", n=4, scorer=scorer, confidence_window=4, **SMALL)
    assert r.costs.self_evals == 0 and r.costs.eval_prefill_tokens == 0
    samples = [(sp, meta) for sp, meta in recorded if sp.max_new_tokens > 0]
    assert len(samples) == 4
    assert all(sp.return_logprob and sp.top_logprobs_num == 20 for sp, _ in samples)
    rule = MethodConfig(scorer=scorer, confidence_window=4).scorer_rule()
    expected = sorted(rule.score(meta["output_top_logprobs"]) for _, meta in samples)
    scores = [c.score for c in r.candidates]
    assert sorted(scores) == pytest.approx(expected)
    assert r.best == max(range(4), key=lambda i: (scores[i], -i))
    assert all(c.scores == [(c.tokens, c.score)] for c in r.candidates)


def test_pruning_ranks_by_the_confidence_of_the_prefix(endless_backend):
    r = run(PROMPT, endless_backend, "prune", n=4, keep=2, prune_at=6, scorer="confidence", **SMALL)
    assert r.costs.self_evals == 0
    continued = [c for c in r.candidates if len(c.scores) == 2]
    first = sorted(r.candidates, key=lambda c: (-c.scores[0][1], r.candidates.index(c)))
    assert {id(c) for c in continued} == {id(c) for c in first[:2]}
    assert all(c.scores[0][0] == 6 for c in r.candidates)


def test_adaptive_with_an_answer_stop_reads_the_confidence(backend):
    r = run(PROMPT, backend, "adaptive", n=4, scorer="confidence", stop="esc", **SMALL)
    assert r.costs.self_evals == 0 and all(c.score is not None for c in r.candidates)
    scores = [c.score for c in r.candidates]
    done = [i for i, c in enumerate(r.candidates) if c.finished or c.tokens >= 12] or list(range(len(scores)))
    assert r.best == max(done, key=lambda i: (scores[i], -i))


def best_of_two_at_temperature_0(backend, **knobs):
    """Best-of-2 at temperature 0: the same text twice, the same on every backend. The program itself runs:
    ``run`` answers temperature 0 with one greedy sample."""
    from sgl_adaptive.programs import PROGRAMS
    from sgl_adaptive.runner import run_program

    config = MethodConfig(n=2, max_new_tokens=8, temperature=0.0, **knobs)
    return run_program(PROGRAMS["best-of-n"], PROMPT, backend, config, name="best-of-n")


def test_the_endpoint_asks_for_top_k_logprobs_without_text(backend):
    server = serve(backend, port=0)
    try:
        endpoint = SGLangEndpoint(f"http://127.0.0.1:{server.server_address[1]}")
        via_http = best_of_two_at_temperature_0(endpoint, scorer="confidence")
        local = best_of_two_at_temperature_0(backend, scorer="confidence")
        bodies = [b for b in server.requests if b["sampling_params"].get("max_new_tokens", 0) > 0]
    finally:
        server.shutdown()
    assert len(bodies) == 2
    assert all(b["return_logprob"] and b["top_logprobs_num"] == 20 for b in bodies)
    assert all(b["return_text_in_logprobs"] is False for b in bodies)
    assert via_http.costs.self_evals == 0
    assert [c.score for c in via_http.candidates] == pytest.approx([c.score for c in local.candidates])
