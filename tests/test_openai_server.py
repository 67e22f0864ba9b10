"""The OpenAI-compatible front (``sgl_adaptive.openai_server``) driven by the real ``openai`` client against the
in-process backend on the tiny model: completions, streaming, per-request options, every error status,
load (429, queue, timeouts), draining shutdown, and ``sgl-adaptive serve`` itself."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import openai
import pytest

from sgl_adaptive import run
from sgl_adaptive.errors import BackendUnavailableError
from sgl_adaptive.openai_server import ServerOptions, serve_openai

PROMPT = "What is 2 + 3?"


class Gate:
    """A backend whose ``generate`` waits until ``open`` is set (keeps runs in flight on demand)."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.open = threading.Event()

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def generate(self, s, sampling_params):
        assert self.open.wait(60), "the gate was never opened"
        return self._backend.generate(s, sampling_params=sampling_params)


class Failing:
    """A backend whose every request raises ``error``."""

    def __init__(self, backend, error: Exception) -> None:
        self._backend, self._error = backend, error

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def generate(self, s, sampling_params):
        raise self._error


class Servers:
    """Starts servers for one test and drains them all at its end."""

    def __init__(self) -> None:
        self.started: list = []
        self.logs: list[str] = []

    def start(self, backend, **options):
        native_url = options.pop("native_url", None)
        server = serve_openai(
            backend,
            port=0,
            model="tiny",
            options=ServerOptions(**options),
            native_url=native_url,
            log=self.logs.append,
        )
        self.started.append(server)
        return server

    def stop(self) -> None:
        for server in self.started:
            server.stop(grace_s=30)


@pytest.fixture()
def servers():
    s = Servers()
    yield s
    s.stop()


def client_for(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, **kwargs)


def chat(client, *, content: str = PROMPT, **kwargs):
    extra = {
        k: kwargs.pop(k)
        for k in list(kwargs)
        if k not in ("max_tokens", "temperature", "top_p", "seed", "stream", "n", "stream_options")
    }
    return client.chat.completions.create(
        model=kwargs.pop("model", "tiny"),
        messages=[{"role": "user", "content": content}],
        extra_body=extra or None,
        **kwargs,
    )


def post(server, body, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---- answers ---------------------------------------------------------------------------------------


def test_chat_completion_matches_the_library_and_carries_usage_and_costs(servers, backend):
    server = servers.start(backend)
    client = client_for(server)
    reply = chat(client, max_tokens=8, seed=3, method="best-of-n", samples=2)
    direct = run(PROMPT, backend, "best-of-n", n=2, max_new_tokens=8, seed=3)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == direct.answer
    assert reply.choices[0].finish_reason in ("stop", "length")
    extra = reply.model_extra["sgl_adaptive"]
    assert extra["method"] == "best-of-n" and extra["samples"] == 2 and extra["self_evals"] == 2
    assert extra["batches"] == 1 and extra["flops"] > 0 and extra["wall_s"] >= 0
    assert extra["tokens"]["generated"] == direct.costs.generated_tokens
    assert "candidates" not in extra and extra["config"]["n"] == 2 and extra["config"]["seed"] == 3
    usage = reply.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens == direct.costs.generated_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert any('"POST /v1/chat/completions" 200' in line and "samples=2" in line for line in servers.logs)


def test_models_and_health(servers, backend):
    server = servers.start(backend)
    client = client_for(server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert get(server, "/health") == (200, {"status": "ok", "running": 0, "waiting": 0})
    assert get(server, "/v1/models/other")[0] == 404


def test_streaming_sends_progress_then_the_chosen_answer(servers, backend):
    server = servers.start(backend)
    client = client_for(server)
    whole = chat(client, max_tokens=8, seed=5, method="best-of-n", samples=2)
    chunks = list(
        chat(
            client,
            max_tokens=8,
            seed=5,
            method="best-of-n",
            samples=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert final[0].model_extra["sgl_adaptive"]["samples"] == 2
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # The raw stream: progress comments (ignored by clients) before the data, [DONE] last.
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "stream": True, "method": "best-of-n",
            "samples": 2, "max_tokens": 8}  # fmt: skip
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.headers["Content-Type"] == "text/event-stream"
        events = answer.read().decode().split("\n\n")
    assert events[0].startswith(": round 1: sampling")
    assert any(e.startswith(": ") and "score" in e for e in events)
    assert [e for e in events if e][-1] == "data: [DONE]"


def test_extra_body_options_reach_the_method(servers, backend):
    server = servers.start(backend)
    client = client_for(server)
    reply = chat(
        client, max_tokens=12, temperature=0.9, top_p=0.95, method="prune", samples=3, keep=1, prune_at=4,
        return_candidates=True,
    )  # fmt: skip
    extra = reply.model_extra["sgl_adaptive"]
    config = extra["config"]
    assert (config["n"], config["keep"], config["prune_at"], config["max_new_tokens"]) == (3, 1, 4, 12)
    assert (config["temperature"], config["top_p"]) == (0.9, 0.95)
    candidates = extra["candidates"]
    assert len(candidates) == 3 and all(c["score"] is not None for c in candidates)
    assert sum(not c["pruned"] for c in candidates) == 1
    assert candidates[extra["best"]]["text"] == reply.choices[0].message.content
    adaptive = chat(client, max_tokens=4, method="adaptive", samples=4, threshold=0.0).model_extra[
        "sgl_adaptive"
    ]
    assert adaptive["samples"] == 1 and adaptive["config"]["threshold"] == 0.0  # stops after the first sample
    rules = chat(client, max_tokens=4, method="adaptive", samples=2, selector="majority", stop_rule="esc",
                 stop_window=2).model_extra["sgl_adaptive"]["config"]  # fmt: skip
    assert (rules["selector"], rules["stop"], rules["stop_window"]) == ("majority", "esc", 2)
    greedy = chat(client, max_tokens=4, method="greedy").model_extra["sgl_adaptive"]
    assert greedy["method"] == "greedy" and greedy["self_evals"] == 0


# ---- what real clients send --------------------------------------------------------------------------


class Recorder:
    """A backend that records every request: its text, its stop strings and what came back."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.calls: list[tuple[str, list[str], str, bool]] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def generate(self, s, sampling_params):
        out, meta = self._backend.generate(s, sampling_params=sampling_params)
        stops = (
            [sampling_params.stop]
            if isinstance(sampling_params.stop, str)
            else list(sampling_params.stop or ())
        )
        self.calls.append((s.text_, stops, out, bool(sampling_params.return_logprob)))
        return out, meta

    def samples(self) -> list[tuple[str, list[str], str]]:
        return [(text, stops, out) for text, stops, out, evaluation in self.calls if not evaluation and out]

    def evaluations(self) -> list[str]:
        return [text for text, _, _, evaluation in self.calls if evaluation]


CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 3 + 4?"},
]


def test_client_defaults_at_their_neutral_values_are_accepted(servers, backend):
    server = servers.start(backend)
    base = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
            "method": "best-of-n", "samples": 2, "seed": 3}  # fmt: skip
    neutral = {"logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
               "parallel_tool_calls": True, "user": "u-1", "metadata": {"k": "v"}, "store": False, "stop": [],
               "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False}  # fmt: skip
    status, plain = post(server, base)
    status_neutral, with_defaults = post(server, {**base, **neutral})
    assert (status, status_neutral) == (200, 200), with_defaults
    assert with_defaults["choices"][0]["message"] == plain["choices"][0]["message"]
    assert with_defaults["choices"][0]["logprobs"] is None


def test_every_problem_of_a_request_is_reported_in_a_stable_order(servers, backend):
    server = servers.start(backend)
    problems = {"zzz": 1, "stop": [""], "method": "beam", "tools": [{"type": "function"}], "aaa": 2, "n": 2}
    answers = []
    for order in (list(problems), list(reversed(problems))):
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}]}
        body.update({k: problems[k] for k in order})
        status, answer = post(server, body)
        assert status == 400
        answers.append(answer["error"])
    assert answers[0] == answers[1]
    message = answers[0]["message"]
    assert message.startswith("6 problems: aaa: unsupported field 'aaa'") and answers[0]["param"] == "aaa"
    positions = [message.index(f"{p}: ") for p in ("aaa", "zzz", "n", "tools", "method", "stop")]
    assert positions == sorted(positions), message


def test_stop_sequences_cut_every_sample_before_it_is_scored(servers, backend):
    recorder = Recorder(backend)
    server = servers.start(recorder)
    client = client_for(server)
    ask = dict(max_tokens=16, seed=7, method="best-of-n", samples=3, return_candidates=True)
    free = chat(client, **ask).model_extra["sgl_adaptive"]["candidates"]
    long = max(free, key=lambda c: len(c["text"]))["text"]
    stop = long[len(long) // 2 : len(long) // 2 + 2]
    assert stop.strip(), long
    recorder.calls.clear()
    reply = chat(client, stop=[stop, "never-generated"], **ask)
    extra = reply.model_extra["sgl_adaptive"]
    expected = [c["text"][: c["text"].find(stop)] if stop in c["text"] else c["text"] for c in free]
    # The same draws (concurrent forks may take each other's seed), each cut at its first stop sequence.
    assert sorted(c["text"] for c in extra["candidates"]) == sorted(expected)
    cut = {f["text"][: f["text"].find(stop)] for f in free if stop in f["text"]}
    assert cut and all(c["finished"] for c in extra["candidates"] if c["text"] in cut)
    assert extra["config"]["stop_sequences"] == [stop, "never-generated"]
    answer = reply.choices[0].message.content
    assert stop not in answer and answer in expected
    if answer in cut:
        assert reply.choices[0].finish_reason == "stop"
    assert all(stop in stops for _, stops, _ in recorder.samples())  # the backend saw the stop sequences
    # Each score read the cut text: the evaluation turn follows it directly.
    closed = "<|im_end|>\n<|im_start|>user\n"
    for text in expected:
        assert any(text + closed in t for t in recorder.evaluations()), text
    assert not any(stop in t.split("<|im_start|>assistant\n")[-2] for t in recorder.evaluations())
    direct = run(PROMPT, backend, "best-of-n", n=3, max_new_tokens=16, seed=7, stop_sequences=[stop])
    assert sorted(c.text for c in direct.candidates) == sorted(expected)


def test_system_and_multi_turn_are_rendered_with_the_chat_template(servers, backend):
    recorder = Recorder(backend)
    server = servers.start(recorder)
    reply = client_for(server).chat.completions.create(
        model="tiny", messages=CONVERSATION, max_tokens=8, seed=2,
        extra_body={"method": "best-of-n", "samples": 2},
    )  # fmt: skip
    rendered = backend.tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    samples = recorder.samples()
    assert len(samples) == 2 and all(text == rendered for text, _, _ in samples)
    assert len(recorder.evaluations()) == 2 and all(t.startswith(rendered) for t in recorder.evaluations())
    extra = reply.model_extra["sgl_adaptive"]
    prompt = backend.tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert reply.usage.prompt_tokens == len(backend.tokenizer.encode(prompt))
    # The conversation is prefilled once: each sample and each evaluation reads it from the cache.
    assert extra["tokens"]["cached"] >= 4 * reply.usage.prompt_tokens
    assert extra["eval_prefill_per_eval"] < reply.usage.prompt_tokens
    direct = run(messages=CONVERSATION, backend=backend, method="best-of-n", n=2, max_new_tokens=8, seed=2)
    assert reply.choices[0].message.content == direct.answer


def test_temperature_0_is_one_greedy_sample_without_evaluation(servers, backend):
    server = servers.start(backend)
    client = client_for(server)
    reply = chat(client, max_tokens=8, temperature=0)  # the default method: adaptive
    extra = reply.model_extra["sgl_adaptive"]
    assert (extra["method"], extra["requested_method"]) == ("greedy", "adaptive")
    assert (extra["samples"], extra["self_evals"], extra["batches"]) == (1, 0, 1)
    assert reply.choices[0].message.content == run(PROMPT, backend, "greedy", max_new_tokens=8).answer
    greedy = chat(client, max_tokens=8, temperature=0.0, top_p=1, method="greedy")
    assert greedy.choices[0].message.content == reply.choices[0].message.content
    assert "requested_method" not in greedy.model_extra["sgl_adaptive"]


def test_logprobs_are_the_chosen_samples_tokens(servers, backend):
    server = servers.start(backend)
    client = client_for(server)
    reply = chat(client, max_tokens=10, seed=4, method="best-of-n", samples=2, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    direct = run(PROMPT, backend, "best-of-n", n=2, max_new_tokens=10, seed=4, logprobs=3)
    chosen = direct.candidates[direct.best].logprobs
    assert reply.choices[0].message.content == direct.answer and len(content) == len(chosen) > 0
    for got, want in zip(content, chosen, strict=True):
        assert (got.token, got.logprob) == (want["token"], pytest.approx(want["logprob"]))
        assert got.bytes == list(got.token.encode()) and got.logprob <= 0
        tops = [t.logprob for t in got.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and got.logprob <= tops[0] + 1e-6
    streamed = chat(client, max_tokens=10, seed=4, method="best-of-n", samples=2, logprobs=True, top_logprobs=3,
                    stream=True)  # fmt: skip
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t.token for p in pieces for t in p.content] == [t.token for t in content]
    greedy = chat(client, max_tokens=10, method="greedy", logprobs=True, top_logprobs=1).choices[0].logprobs
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in greedy.content)  # the argmax


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"method": "beam"}, "method", "unknown method 'beam'"),
        ({"samples": 0}, "samples", "samples must be at least 1"),
        ({"samples": 65}, "samples", "at most 64"),
        ({"samples": "4"}, "samples", "must be an integer"),
        ({"temperature": "hot"}, "temperature", "must be a number"),
        ({"threshold": 2}, "threshold", "threshold must be within [0, 1]"),
        ({"method": "prune", "samples": 2, "keep": 3}, "keep", "keep must not exceed samples"),
        ({"method": "best-of-n", "keep": 2}, "keep", "keep is not used by method best-of-n"),
        ({"method": "greedy", "temperature": 0.5}, "temperature", "not used by method greedy"),
        ({"n": 2}, "n", "the sample budget is the `samples` field"),
        ({"best_of": 4}, "best_of", "the sample budget is `samples`"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools="),
        ({"tool_choice": "auto"}, "tool_choice", "accepted: 'none'"),
        ({"response_format": {"type": "json_object"}}, "response_format", "accepted: {'type': 'text'}"),
        ({"logit_bias": {"17": 5}}, "logit_bias", "accepted: {}"),
        ({"functions": [{"name": "f"}]}, "functions", "no tools are served"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stop": [""]}, "stop", "must not be empty"),
        ({"stop": 3}, "stop", "a string or a list of strings"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "within [0, 20]"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
        ({"logprobs": 1}, "logprobs", "true or false"),
        ({"max_tokens": 4, "max_completion_tokens": 4}, "max_completion_tokens", "not both"),
        ({"stream": "yes"}, "stream", "true or false"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": None},
                    {"role": "user", "content": "c"},
                ]
            },
            "messages",
            "message 1: a assistant message needs content",
        ),  # fmt: skip
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
                    {"role": "tool", "content": "42", "tool_call_id": "1"},
                ]
            },
            "messages",
            "message 1: assistant tool calls are not supported",
        ),  # fmt: skip
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}]},
            "messages",
            "message 1: tool messages are not supported",
        ),  # fmt: skip
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "messages",
            "only as the first message",
        ),  # fmt: skip
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "messages",
            "the last message must be from the user",
        ),  # fmt: skip
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
            "only text content parts",
        ),  # fmt: skip
        ({"messages": [{"role": "user", "content": "  "}]}, "messages", "empty"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"model": None}, "model", "`model` is required"),
    ],
)
def test_bad_fields_are_400_with_the_field_named(servers, backend, body, param, needle):
    server = servers.start(backend)
    request = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, **body}
    status, answer = post(server, request)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and needle in error["message"]


def test_openai_client_sees_400_404_and_413(servers, backend):
    server = servers.start(backend)
    client = client_for(server)
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, method="best-of-n", keep=3)
    assert error_of(bad.value)["param"] == "keep"
    with pytest.raises(openai.NotFoundError) as unknown:
        chat(client, model="gpt-4o")
    assert error_of(unknown.value)["code"] == "model_not_found"
    too_long = "seven " * (backend.context_length + 5)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as long:
            chat(client, content=too_long, method="best-of-n", samples=2, max_tokens=4, stream=stream)
        assert long.value.status_code == 413
        error = error_of(long.value)
        assert error["code"] == "context_length_exceeded" and "context" in error["message"]
    assert post(server, b"{not json")[0] == 400
    assert get(server, "/v1/nothing")[0] == 404


def test_a_body_that_never_arrives_is_408(servers, backend):
    server = servers.start(backend, read_timeout_s=0.5)
    with socket.create_connection(server.server_address[:2], timeout=30) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        answer = conn.makefile("rb").read().decode()
    assert answer.startswith("HTTP/1.0 408") and '"code": "request_timeout"' in answer


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            BackendUnavailableError("lost the SGLang server at http://127.0.0.1:9: connection refused"),
            "backend_unavailable",
        ),
        (RuntimeError("CUDA error: an illegal memory access"), "backend_failed"),
    ],
)
def test_a_failing_backend_is_502(servers, backend, error, code):
    server = servers.start(Failing(backend, error))
    with pytest.raises(openai.APIStatusError) as failed:
        chat(client_for(server), method="best-of-n", samples=2, max_tokens=4)
    assert failed.value.status_code == 502 and error_of(failed.value)["code"] == code
    assert get(server, "/health")[0] == 200


def test_a_full_queue_is_429_and_none_of_16_concurrent_requests_is_lost(servers, backend):
    gate = Gate(backend)
    server = servers.start(gate, max_concurrency=2, max_queue=4)
    client = client_for(server, timeout=120)
    outcomes: list = []

    def ask(i: int) -> None:
        try:
            reply = chat(client, content=f"What is {i} + 1?", method="best-of-n", samples=2, max_tokens=6)
            outcomes.append(("ok", reply.choices[0].message.content))
        except openai.RateLimitError as exc:
            outcomes.append(("429", error_of(exc)["code"]))
        except Exception as exc:  # anything else is a lost request
            outcomes.append(("lost", repr(exc)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    wait_for(lambda: len(outcomes) == 10 and server.admission.running == 2 and server.admission.waiting == 4)
    assert get(server, "/health") == (200, {"status": "ok", "running": 2, "waiting": 4})
    gate.open.set()
    for t in threads:
        t.join(120)
    kinds = Counter(kind for kind, _ in outcomes)
    assert kinds == {"ok": 6, "429": 10}, outcomes
    assert {value for kind, value in outcomes if kind == "429"} == {"queue_full"}
    wait_for(lambda: server.admission.idle)
    assert get(server, "/health")[0] == 200
    assert chat(client, method="greedy", max_tokens=4).choices[0].message.content is not None
    assert sum(" 429 " in line for line in servers.logs) == 10


def test_16_concurrent_requests_on_the_tiny_model_are_all_answered_or_429(servers, backend):
    server = servers.start(backend, max_concurrency=4, max_queue=8)
    client = client_for(server, timeout=120)
    statuses: list[int] = []

    def ask(i: int) -> None:
        try:
            chat(client, content=f"Name the number {i}.", method="best-of-n", samples=2, max_tokens=6)
            statuses.append(200)
        except openai.APIStatusError as exc:
            statuses.append(exc.status_code)
        except Exception:
            statuses.append(-1)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(statuses) == 16 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 12  # at least the running and queued ones
    wait_for(lambda: server.admission.idle)
    assert get(server, "/health")[0] == 200


def test_a_request_past_its_timeout_is_504_and_its_slot_returns_when_the_run_ends(servers, backend):
    gate = Gate(backend)
    server = servers.start(gate, max_concurrency=1, max_queue=1, request_timeout_s=0.5)
    client = client_for(server)
    with pytest.raises(openai.APIStatusError) as late:
        chat(client, method="greedy", max_tokens=4)
    assert late.value.status_code == 504 and error_of(late.value)["code"] == "timeout"
    assert server.admission.running == 1  # the run goes on until it ends
    with pytest.raises(openai.APIStatusError) as queued:
        chat(client, method="greedy", max_tokens=4)
    assert queued.value.status_code == 504 and "in the queue" in error_of(queued.value)["message"]
    gate.open.set()
    wait_for(lambda: server.admission.idle)


def test_stop_drains_in_flight_requests_and_refuses_new_ones_with_503(servers, backend):
    gate = Gate(backend)
    server = servers.start(gate)
    client = client_for(server, timeout=60)
    answers: list = []
    worker = threading.Thread(target=lambda: answers.append(chat(client, method="greedy", max_tokens=4)))
    worker.start()
    wait_for(lambda: server.admission.running == 1)
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(server.stop(grace_s=30)))
    stopper.start()
    wait_for(lambda: server.draining)
    with pytest.raises(openai.APIStatusError) as refused:
        chat(client, method="greedy", max_tokens=4)
    assert refused.value.status_code == 503 and error_of(refused.value)["code"] == "shutting_down"
    assert get(server, "/health")[0] == 503
    gate.open.set()
    worker.join(60)
    stopper.join(60)
    assert stopped == [True] and answers and answers[0].choices[0].message.content is not None


# ---- in front of an SGLang server, and the native API ----------------------------------------------


def test_in_front_of_an_sglang_server_and_forwarding_its_native_api(servers, backend):
    """``--endpoint``: the front over ``SGLangEndpoint`` (here against the in-process engine served over
    SGLang's HTTP API); ``--model``: native requests forwarded to that API."""
    from sgl_adaptive.backends.endpoint import SGLangEndpoint
    from sgl_adaptive.backends.http_server import serve

    native = serve(backend, port=0)
    try:
        native_url = f"http://127.0.0.1:{native.server_address[1]}"
        front = servers.start(SGLangEndpoint(native_url))
        client = client_for(front)
        via_server = chat(client, method="greedy", max_tokens=6)
        assert (
            via_server.choices[0].message.content == run(PROMPT, backend, "greedy", max_new_tokens=6).answer
        )
        assert via_server.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError) as seeded:  # the server's sampling seed is not ours
            chat(client, method="best-of-n", samples=2, max_tokens=4, seed=1)
        assert error_of(seeded.value)["param"] == "seed"
        greedy = chat(client, max_tokens=6, temperature=0, seed=1)  # nothing sampled: the seed is neutral
        assert greedy.choices[0].message.content == via_server.choices[0].message.content
        # Stop sequences reach the SGLang server in every sample request, and cut as in process.
        stop = via_server.choices[0].message.content[2:4]
        stopped = chat(client, method="best-of-n", samples=2, max_tokens=6, stop=stop, return_candidates=True)
        sent = [
            b["sampling_params"] for b in native.requests if b["sampling_params"].get("max_new_tokens", 0) > 1
        ]
        assert all(stop in p["stop"] for p in sent[-2:])
        assert all(stop not in c["text"] for c in stopped.model_extra["sgl_adaptive"]["candidates"])
        with pytest.raises(openai.APIStatusError) as long:
            chat(client, content="seven " * (backend.context_length + 5), method="greedy", max_tokens=4)
        assert long.value.status_code == 413
        assert get(front, "/health")[0] == 200
        both = servers.start(backend, native_url=native_url)
        assert get(both, "/get_model_info")[1]["model_path"] == backend.model_path
        endpoint = SGLangEndpoint(both.url)  # the native API through the front's port
        assert (
            run(PROMPT, endpoint, "greedy", max_new_tokens=6).answer == via_server.choices[0].message.content
        )
    finally:
        native.shutdown()
    assert get(front, "/health")[0] == 503  # the SGLang server behind it is gone


# ---- the command line ------------------------------------------------------------------------------


def test_serve_checks_its_options_before_loading_anything():
    from typer.testing import CliRunner

    from sgl_adaptive.cli import app

    runner = CliRunner()
    for args, needle in [
        (["--max-concurrency", "0"], "--max-concurrency must be at least 1"),
        (["--request-timeout", "0"], "--request-timeout must be positive"),
        (["--max-samples", "0"], "--max-samples must be at least 1"),
        (["--model", "/nonexistent/model", "--endpoint", "http://127.0.0.1:9"], "not both"),
        (["--endpoint", "http://127.0.0.1:9"], "cannot reach the SGLang server"),
    ]:
        res = runner.invoke(
            app,
            ["serve", "--model", "/nonexistent/model", *args]
            if "--model" not in args and "--endpoint" not in args
            else ["serve", *args],
            env={"COLUMNS": "300"},
        )
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output


def test_serve_answers_openai_and_native_requests_and_drains_on_sigterm(tiny_model_dir: Path):
    command = [sys.executable, "-m", "sgl_adaptive.cli", "serve", "--model", str(tiny_model_dir), "--port", "0",
               "--device", "cpu", "--served-model-name", "tiny"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "300"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        lines: list[str] = []
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            url = found.group(0) if found else None
        assert url, "".join(lines)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert (
            chat(client, method="best-of-n", samples=2, max_tokens=4).model_extra["sgl_adaptive"]["samples"]
            == 2
        )
        with urllib.request.urlopen(url + "/get_model_info", timeout=30) as answer:  # the native API
            assert json.loads(answer.read())["model_path"] == str(tiny_model_dir)
        stream = chat(client, method="best-of-n", samples=2, max_tokens=24, stream=True)
        proc.send_signal(signal.SIGTERM)  # the streamed request is in flight: it must still complete
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert proc.wait(120) == 0
        rest = proc.stderr.read()
        assert '"POST /v1/chat/completions" 200' in "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
