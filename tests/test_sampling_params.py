"""Every request the programs send to an SGLang server states the sampling fields they rely on.

An SGLang server fills the fields a request leaves out from its defaults; with ``--sampling-defaults
model`` (its default) those come from the model's generation_config.json (the official
Qwen2.5-Instruct: top_p 0.8, top_k 20, repetition_penalty 1.05). The request bodies are captured by the
in-process server that speaks SGLang's HTTP API.
"""

from __future__ import annotations

import pytest

from sgl_adaptive import run
from sgl_adaptive.backends.endpoint import NEUTRAL_SAMPLING, SGLangEndpoint
from sgl_adaptive.backends.http_server import serve
from sgl_adaptive.programs.common import NEUTRAL_SAMPLING as PROGRAM_NEUTRAL

STATED = {
    "max_new_tokens": None,
    "temperature": None,
    "top_p": None,
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "ignore_eos": False,
}
"""Field -> the value every request must carry (None: present and not null, value checked below)."""


@pytest.fixture(scope="module")
def server(backend):
    srv = serve(backend, port=0)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def endpoint(server):
    return SGLangEndpoint(f"http://127.0.0.1:{server.server_address[1]}")


@pytest.mark.parametrize("method", ["greedy", "best-of-n", "adaptive", "prune", "adaptive-prune"])
def test_every_request_states_its_sampling_fields(server, endpoint, method):
    server.requests.clear()
    result = run(
        "What is 2 + 3?",
        endpoint,
        method,
        n=4,
        max_new_tokens=8,
        prune_at=4,
        keep=2,
        temperature=0.6,
        top_p=0.9,
        threshold=1.0,
    )
    assert result.candidates
    # The frontend's own prefix commits (fork) send {"max_new_tokens": 0}: they sample nothing.
    bodies = [b for b in server.requests if b["sampling_params"] != {"max_new_tokens": 0}]
    assert bodies
    for body in bodies:
        sp = body["sampling_params"]
        for field, want in STATED.items():
            assert sp.get(field) is not None, (field, sp)
            if want is not None:
                assert sp[field] == want, (field, sp)
    evals = [b["sampling_params"] for b in bodies if b.get("return_logprob")]
    draws = [
        b["sampling_params"]
        for b in bodies
        if not b.get("return_logprob") and b["sampling_params"]["max_new_tokens"] > 0
    ]
    assert draws
    assert all(sp["top_p"] == 0.9 for sp in draws)
    if method == "greedy":
        assert [sp["temperature"] for sp in draws] == [0.0] * len(draws)
    else:
        assert any(sp["temperature"] > 0 for sp in draws)
        assert all(0.0 <= sp["temperature"] <= 0.6 + 1e-9 for sp in draws)
    if method != "greedy":
        assert evals
    for sp in evals:  # the self-evaluation: one greedy token, nucleus off
        assert (sp["max_new_tokens"], sp["temperature"], sp["top_p"]) == (1, 0.0, 1.0)


def test_the_neutral_values_agree_between_programs_and_endpoint():
    shared = set(PROGRAM_NEUTRAL) & set(NEUTRAL_SAMPLING)
    assert shared >= {"top_k", "min_p", "frequency_penalty", "presence_penalty"}
    assert all(PROGRAM_NEUTRAL[k] == NEUTRAL_SAMPLING[k] for k in shared)
    assert NEUTRAL_SAMPLING["repetition_penalty"] == 1.0  # the one field sgl.gen cannot send
