"""Clients nobody here wrote, against the OpenAI front on the tiny model: lm-evaluation-harness
(``local-chat-completions`` with a chat template: 0-shot, a system instruction, multi-turn few-shot, on a local
JSONL task), langchain-openai (plain, streaming, a system message, stop) and the ``openai`` client. Each
answer is checked against the library's own ``run`` on the same conversation."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from sgl_adaptive import run
from sgl_adaptive.openai_server import ServerOptions, serve_openai

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (4, 4), (1, 6)]]
SYSTEM = "Answer with a number."


class Recorder:
    """A backend that records each sample request: its text and stop strings."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.samples: list[tuple[str, list[str]]] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def generate(self, s, sampling_params):
        if not sampling_params.return_logprob and sampling_params.max_new_tokens:
            stop = sampling_params.stop
            self.samples.append((s.text_, [stop] if isinstance(stop, str) else list(stop or ())))
        return self._backend.generate(s, sampling_params=sampling_params)


@pytest.fixture()
def served(backend):
    recorder = Recorder(backend)
    server = serve_openai(recorder, port=0, model="tiny", options=ServerOptions(), log=lambda line: None)
    yield server, recorder
    server.stop(grace_s=30)


def a_stop(text: str) -> str:
    """Two printable characters from the second half of ``text``: a stop sequence that this answer holds."""
    for i in range(len(text) // 2, len(text) - 1):
        window = text[i : i + 2]
        if window.isascii() and window.isprintable() and window.strip():
            return window
    raise AssertionError(f"no stop sequence to take from {text!r}")


def greedy_answer(backend, messages: list[dict], **knobs) -> str:
    return run(messages=messages, backend=backend, method="greedy", max_new_tokens=8, **knobs).answer


def doc_messages(doc: dict, system: str | None = None, shots: list[dict] = ()) -> list[dict]:
    turns = [{"role": "system", "content": system}] if system else []
    for shot in shots:
        turns += [{"role": "user", "content": f"Question: {shot['question']}\nAnswer:"},
                  {"role": "assistant", "content": shot["answer"]}]  # fmt: skip
    return [*turns, {"role": "user", "content": f"Question: {doc['question']}\nAnswer:"}]


def write_task(folder: Path, stops: list[str]) -> str:
    """A generative lm-eval task over a local JSONL file (greedy, at most 8 tokens, ``until`` = ``stops``)."""
    data = folder / "arith.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    until = ", ".join(json.dumps(s) for s in stops)
    (folder / "arith.yaml").write_text(
        f"""task: tiny_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [{until}]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
        encoding="utf-8",
    )
    return "tiny_arith"


def test_lm_eval_runs_zero_shot_with_a_system_instruction_and_multi_turn_few_shot(served, backend, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    server, recorder = served
    first = greedy_answer(backend, doc_messages(DOCS[0]))
    stop = a_stop(first)
    task = write_task(tmp_path, ["Question:", stop])
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    model_args = f"model=tiny,base_url={server.url}/v1/chat/completions,tokenizer_backend=None"
    for variant in ({}, {"system_instruction": SYSTEM}, {"system_instruction": SYSTEM, "num_fewshot": 2}):
        recorder.samples.clear()
        out = lm_eval.simple_evaluate(
            model="local-chat-completions", model_args=model_args, tasks=[task], task_manager=manager,
            apply_chat_template=True, fewshot_as_multiturn=True, log_samples=True, **variant,
        )  # fmt: skip
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(DOCS) == len(recorder.samples), variant
        assert 0.0 <= out["results"][task]["exact_match,none"] <= 1.0
        # lm-eval's `until` arrives as stop sequences on every sample request
        assert all("Question:" in stops and stop in stops for _, stops in recorder.samples)
        for sample in samples:
            context = sample["arguments"][0][0]  # lm-eval's JsonChatStr (a tuple): the messages as JSON
            messages = json.loads(context[0])
            roles = [m["role"] for m in messages]
            assert roles[0] == ("system" if variant else "user")
            assert roles.count("assistant") == variant.get("num_fewshot", 0)  # multi-turn few-shot
            expected = greedy_answer(backend, messages, stop_sequences=["Question:", stop])
            assert sample["resps"] == [[expected]] and stop not in expected  # greedy: temperature 0
            rendered = backend.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            assert rendered in [text for text, _ in recorder.samples]
        if not variant:  # 0-shot doc 0 is cut at the stop taken from its own greedy answer
            assert samples[0]["resps"] == [[first[: first.index(stop)]]]


def test_langchain_plain_streaming_system_and_stop(served, backend):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    server, _ = served
    llm = ChatOpenAI(
        model="tiny", base_url=server.url + "/v1", api_key="none", max_tokens=8, temperature=0.7, seed=3,
        max_retries=0, extra_body={"method": "best-of-n", "samples": 2},
    )  # fmt: skip
    question = "What is 2 + 3?"
    plain = llm.invoke(question)
    direct = run(question, backend, "best-of-n", n=2, max_new_tokens=8, temperature=0.7, seed=3)
    assert plain.content == direct.answer
    assert plain.response_metadata["finish_reason"] in ("stop", "length")
    assert plain.usage_metadata["output_tokens"] == direct.costs.generated_tokens
    streamed = "".join(chunk.content for chunk in llm.stream(question))
    assert streamed == plain.content
    conversation = [SystemMessage(SYSTEM), HumanMessage(question)]
    with_system = llm.invoke(conversation)
    expected = run(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                   backend=backend, method="best-of-n", n=2, max_new_tokens=8, temperature=0.7, seed=3)  # fmt: skip
    assert with_system.content == expected.answer
    texts = [c.text for c in expected.candidates]
    stop = a_stop(max(texts, key=len))
    stopped = llm.invoke(conversation, stop=[stop])
    assert stop not in stopped.content
    assert stopped.content in [t[: t.find(stop)] if stop in t else t for t in texts]


def test_the_openai_client_with_a_system_message_stop_and_temperature_0(served, backend):
    server, recorder = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    messages = doc_messages(DOCS[1], SYSTEM, DOCS[2:])
    first = greedy_answer(backend, messages)
    stop = a_stop(first)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                           stop=[stop], seed=1234)  # fmt: skip
    assert reply.choices[0].message.content == first[: first.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model_extra["sgl_adaptive"]["samples"] == 1 and len(recorder.samples) == 1
