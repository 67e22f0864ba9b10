"""The SGLang server path: SGLangEndpoint against a process speaking SGLang's HTTP API.

The SGLang server itself needs a GPU; ``http_server.serve`` answers the same endpoints from the
in-process engine, so this exercises the endpoint adapter's requests and responses end to end.
"""

from __future__ import annotations

import socket

import pytest

from sgl_adaptive import run
from sgl_adaptive.backends.endpoint import SGLangEndpoint
from sgl_adaptive.backends.http_server import serve
from sgl_adaptive.errors import BackendUnavailableError, PromptTooLongError


@pytest.fixture(scope="module")
def server(backend):
    srv = serve(backend, port=0)
    yield srv
    srv.shutdown()


def url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_programs_run_through_the_endpoint_with_exact_answer_logprobs(server, backend):
    endpoint = SGLangEndpoint(url(server))
    assert endpoint.chat_template.role_prefix_and_suffix == backend.chat_template.role_prefix_and_suffix
    assert endpoint.model_shape is not None
    server.requests.clear()
    r = run("What is 2 + 3?", endpoint, "best-of-n", n=3, max_new_tokens=10)
    assert len(r.candidates) == 3 and all(c.score is not None for c in r.candidates)
    evals = [b for b in server.requests if b.get("return_logprob")]
    assert len(evals) == 3
    assert all(sorted(b["token_ids_logprob"]) == sorted(backend.answer_ids) for b in evals)
    assert all(b["sampling_params"]["max_new_tokens"] == 1 for b in evals)
    assert r.costs.self_evals == 3 and r.costs.flops > 0


def test_endpoint_and_local_backend_agree_on_greedy(server, backend):
    endpoint = SGLangEndpoint(url(server))
    via_http = run("What is 4 + 4?", endpoint, "greedy", max_new_tokens=10)
    local = run("What is 4 + 4?", backend, "greedy", max_new_tokens=10)
    assert via_http.answer == local.answer
    assert via_http.costs.generated_tokens == local.costs.generated_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_one_line_error():
    with pytest.raises(BackendUnavailableError, match="cannot reach"):
        SGLangEndpoint(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2)


def test_server_errors_surface_from_the_program(server, backend):
    """A prompt over the context is the library's PromptTooLongError through a server too (the OpenAI
    front answers it 413); other refusals stay BackendUnavailableError."""
    endpoint = SGLangEndpoint(url(server))
    with pytest.raises(PromptTooLongError, match="refused the prompt.*context"):
        run("seven " * (backend.context_length + 5), endpoint, "best-of-n", n=2, max_new_tokens=4)
