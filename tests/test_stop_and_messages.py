"""Stop sequences, conversations and temperature 0 in the Python API, ``sgl-adaptive run`` and ``batch`` (the
OpenAI front's side is in test_openai_server.py, the real clients in test_openai_clients.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_adaptive import MethodConfig, UserError, run
from sgl_adaptive.batch import BatchSettings, load_batch, run_batch_file
from sgl_adaptive.cli import app
from sgl_adaptive.conversation import Message, check_messages

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "What is 2 + 3?"
CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "3 + 4?"}]},
]


def a_stop(texts: list[str]) -> str:
    """Two characters from the middle of the longest text: a stop sequence these samples generate."""
    longest = max(texts, key=len)
    stop = longest[len(longest) // 2 : len(longest) // 2 + 2]
    assert stop.strip(), texts
    return stop


def test_a_one_message_conversation_is_the_plain_prompt(backend):
    backend.flush_cache()
    plain = run(PROMPT, backend, "best-of-n", n=2, max_new_tokens=6, seed=1)
    backend.flush_cache()
    chat = run(messages=[{"role": "user", "content": PROMPT}], backend=backend, method="best-of-n", n=2,
               max_new_tokens=6, seed=1)  # fmt: skip
    assert sorted(c.text for c in chat.candidates) == sorted(c.text for c in plain.candidates)
    assert chat.costs.prefill_tokens == plain.costs.prefill_tokens


def test_a_conversation_is_answered_and_refused_where_it_cannot_be_rendered(backend):
    turns = check_messages(CONVERSATION)
    assert turns[0] == Message("system", "Answer with a number.") and turns[-1] == Message(
        "user", "And 3 + 4?"
    )
    first = run(messages=CONVERSATION, backend=backend, method="best-of-n", n=2, max_new_tokens=6, seed=1)
    again = run(turns, backend, "best-of-n", n=2, max_new_tokens=6, seed=1)  # checked turns as the prompt
    assert first.answer == again.answer and first.costs.self_evals == 2
    for messages, needle in [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}, {"role": "user", "content": "b"}],
         "message 1: a assistant message needs content"),
        ([{"role": "tool", "content": "4"}, {"role": "user", "content": "b"}], "message 0: tool messages"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text content"),
        ([{"role": "user", "content": "a", "name": "x"}], "unsupported field 'name'"),
        ([], "non-empty list"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=needle) as refused:
            run(messages=messages, backend=backend, method="greedy")
        assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="not both"):
        run(PROMPT, backend, messages=CONVERSATION)
    with pytest.raises(UserError, match="no prompt"):
        run(backend=backend)


def test_stop_sequences_cut_each_sample_on_every_method(backend):
    free = run(PROMPT, backend, "best-of-n", n=3, max_new_tokens=16, seed=5)
    stop = a_stop([c.text for c in free.candidates])
    cut = run(PROMPT, backend, "best-of-n", n=3, max_new_tokens=16, seed=5, stop_sequences=[stop])
    expected = sorted(t[: t.find(stop)] if stop in t else t for t in (c.text for c in free.candidates))
    assert sorted(c.text for c in cut.candidates) == expected
    assert all(c.finished for c in cut.candidates if c.text not in {f.text for f in free.candidates})
    assert cut.config["stop_sequences"] == [stop]
    for method, knobs in [("greedy", {}), ("adaptive", {"n": 3, "threshold": 1.0}),
                          ("prune", {"n": 3, "keep": 1, "prune_at": 4})]:  # fmt: skip
        result = run(PROMPT, backend, method, max_new_tokens=16, seed=5, stop_sequences=(stop, "zz"), **knobs)
        assert all(stop not in c.text for c in result.candidates), method
    for bad, needle in [(["a"] * 5, "at most 4 stop sequences"), ([""], "non-empty string")]:
        with pytest.raises(UserError, match=needle):
            MethodConfig(stop_sequences=bad)


def test_temperature_0_answers_with_one_greedy_sample(backend):
    result = run(PROMPT, backend, "adaptive", n=8, temperature=0.0, max_new_tokens=8)
    assert (result.method, result.requested_method, result.costs.samples, result.costs.self_evals) == (
        "greedy", "adaptive", 1, 0
    )  # fmt: skip
    assert result.answer == run(PROMPT, backend, "greedy", max_new_tokens=8).answer
    assert result.to_dict()["requested_method"] == "adaptive"
    assert "temperature 0: greedy instead of adaptive" in result.summary()
    assert "requested_method" not in run(PROMPT, backend, "best-of-n", n=2, max_new_tokens=4).to_dict()


def test_run_command_takes_stop_sequences_under_their_own_name(tiny_model_dir):
    runner = CliRunner()
    base = ["run", PROMPT, "--model", str(tiny_model_dir), "--device", "cpu", "--method", "best-of-n",
            "--n", "2", "--max-new-tokens", "16", "--json"]  # fmt: skip
    free = json.loads(runner.invoke(app, base).stdout)
    stop = a_stop([c["text"] for c in free["candidates"]])
    res = runner.invoke(app, [*base, "--stop-sequence", stop, "--stop-sequence", "zz"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["config"]["stop_sequences"] == [stop, "zz"] and record["config"]["stop"] == "threshold"
    assert all(stop not in c["text"] for c in record["candidates"])
    many = runner.invoke(app, [*base, *[a for i in range(5) for a in ("--stop-sequence", f"s{i}")]])
    lines = many.output.strip().splitlines()
    assert many.exit_code == 2 and len(lines) == 1 and "at most 4 stop sequences" in lines[0]


class Texts:
    """A backend that keeps the text of every request."""

    def __init__(self, backend) -> None:
        self._backend, self.seen = backend, []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def generate(self, s, sampling_params):
        self.seen.append(s.text_)
        return self._backend.generate(s, sampling_params=sampling_params)


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_batch_lines_may_be_conversations(tmp_path, backend):
    source = write(tmp_path / "p.jsonl", [
        {"id": "chat", "messages": CONVERSATION, "reference": "7"},
        {"id": "plain", "prompt": "And 3 + 4?"},
        {"messages": [{"role": "user", "content": "Hi"}]},
    ])  # fmt: skip
    items = load_batch(source)
    assert [i.id for i in items][:2] == ["chat", "plain"] and items[2].id.startswith("m-")
    assert items[0].prompt == "And 3 + 4?" and items[0].reference == "7" and len(items[0].messages) == 4
    settings = BatchSettings(6, method="best-of-n", config=MethodConfig(max_new_tokens=6, n=2))
    texts = Texts(backend)
    summary, _ = run_batch_file(source, tmp_path / "out.jsonl", lambda: texts, settings)
    lines = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert summary.prompts == 3 and lines["chat"]["samples"] == 2 and "correct" in lines["chat"]
    turns = [m.to_dict() for m in check_messages(CONVERSATION)]
    rendered = backend.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert texts.seen.count(rendered) == 2  # the chat line's two samples continue the whole conversation
    bad = write(tmp_path / "bad.jsonl", [{"id": "x", "messages": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(UserError, match="bad.jsonl: record 1: the last message must be from the user"):
        load_batch(bad)
