"""``bench rescore``: a sweep's pools re-scored offline by the packed scorer, then replayed.

Re-scoring with the model that drew the pools (fp32) must give back its scores: that proves the prompt
and the prefixes at the budgets are the program's. The tiny random model samples token sequences its
tokenizer would not produce (re-encoding the text gives other tokens), so the check uses a copy whose
output head only emits whole words (``canonical_model``); the self-evaluation rows are left as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_adaptive.bench.rescore import MANIFEST, prefix_texts
from sgl_adaptive.bench.store import read_lines
from sgl_adaptive.cli import app

runner = CliRunner()
WORDS = (" the", " a", " of", " to", " is", " five", " sum")


def bench(*args: object):
    return runner.invoke(app, ["bench", *map(str, args)])


def canonical_model(src: Path, dst: Path) -> Path:
    """``src`` with an output head that emits only ``WORDS`` and the end of sequence (rows along the mean
    final hidden state plus a random part) and keeps the answer words' rows: every response is then its
    tokenizer's own encoding of its text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgl_adaptive.selfeval import SelfEvalConfig, answer_token_ids

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    safe = [tok.encode(w, add_special_tokens=False) for w in WORDS]
    assert all(len(ids) == 1 for ids in safe)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok(" ".join(WORDS) + " What is 2 + 3? the answer", return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        u = model.model(ids).last_hidden_state[0].mean(0)
        u /= u.norm()
        head = model.lm_head.weight
        answers = {i: head[i].clone() for i in answer_token_ids(tok, SelfEvalConfig())}
        head.zero_()
        for i, row in answers.items():
            head[i] = row
        for i in [ids[0] for ids in safe] + [eos]:
            r = torch.randn(head.shape[1], generator=generator)
            head[i] = u + r / r.norm()
        head[eos] -= 0.3 * u
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "three.jsonl"
    rows = [
        {"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"} for a, b in [(2, 3), (10, 4), (7, 1)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, questions, tmp_path_factory) -> Path:
    """A sweep of the canonical model in fp32: 3 questions, pools of 3 scored at 2, 4 and 8 tokens."""
    root = tmp_path_factory.mktemp("rescore")
    model = canonical_model(tiny_model_dir, root / "canonical")
    out = root / "sweep"
    res = bench("--model", model, "--dataset", questions, "--out", out, "--mode", "sweep", "--n", "3",
                "--max-new-tokens", "12", "--budgets", "2,4,8", "--methods", "best-of-n,adaptive,prune",
                "--threshold", "0.5,1.0", "--dtype", "float32")  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def pools(folder: Path) -> dict[str, dict]:
    return {r["key"]: r for r in read_lines(folder / "pools.jsonl") if r["kind"] == "pool"}


def results(folder: Path) -> dict[str, dict]:
    return {r["key"]: r for r in read_lines(folder / "results.jsonl")}


def test_the_drawing_model_gives_back_its_own_scores(sweep, tmp_path):
    out = tmp_path / "same"
    model = sweep.parent / "canonical"
    res = bench(
        "rescore", "--pools", sweep / "pools.jsonl", "--model", model, "--out", out, "--dtype", "float32"
    )
    assert res.exit_code == 0, res.output
    before, after = pools(sweep), pools(out)
    assert after.keys() == before.keys() and len(after) == 3
    cut = finished = 0
    for key, record in after.items():
        assert record["rescored_by"]["model"] == str(model) and record["rescored_by"]["dtype"] == "float32"
        for old, new in zip(before[key]["candidates"], record["candidates"], strict=True):
            assert new["prefix_faithful"]
            assert {k: new[k] for k in old if k not in ("score", "scores")} == {
                k: old[k] for k in old if k not in ("score", "scores")
            }  # texts, tokens, training-free scores ... kept
            assert new["original_scores"] == old["scores"]
            assert [t for t, _ in new["scores"]] == [t for t, _ in old["scores"]]
            assert [s for _, s in new["scores"]] == pytest.approx([s for _, s in old["scores"]], abs=1e-4)
            assert new["score"] == pytest.approx(old["score"], abs=1e-4)
            cut += sum(t < old["tokens"] for t, _ in old["scores"])
            finished += old["finished"]
    assert cut >= 6 and 0 < finished < 9  # prefixes at the budgets, and samples that stopped and did not
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["unfaithful_samples"] == 0 and manifest["max_abs_change"] < 1e-4
    assert manifest["tokenizer"] == str(model) and manifest["evaluations"] == sum(
        len(c["scores"]) for r in after.values() for c in r["candidates"]
    )
    # the sweep replayed from the re-scored pools: the same lines, the same scores
    old_lines, new_lines = results(sweep), results(out)
    assert new_lines.keys() == old_lines.keys()
    for key, line in new_lines.items():
        assert line["score"] == pytest.approx(old_lines[key]["score"], abs=1e-4)
    assert (out / "summary.md").is_file()
    again = bench(
        "rescore", "--pools", sweep / "pools.jsonl", "--model", model, "--out", out, "--dtype", "float32"
    )
    assert again.exit_code == 0 and "nothing to run" in again.output
    assert len(list(read_lines(out / "pools.jsonl"))) == 3


def test_another_model_changes_the_scores_and_the_report_runs(sweep, tmp_path):
    from sgl_adaptive.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "other-scored"
    res = bench(
        "rescore", "--pools", sweep / "pools.jsonl", "--model", other, "--out", out, "--dtype", "float32"
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / MANIFEST).read_text())
    # its tokenizer differs: the prefixes are still cut with the one that generated the pools
    assert manifest["model"] == str(other) and manifest["tokenizer"] == str(sweep.parent / "canonical")
    assert manifest["max_abs_change"] > 1e-3
    before, after = pools(sweep), pools(out)
    for key, record in after.items():
        for old, new in zip(before[key]["candidates"], record["candidates"], strict=True):
            assert new["text"] == old["text"] and new["tokens"] == old["tokens"]
    lines = results(out)
    assert lines.keys() == results(sweep).keys()
    assert any(
        line["score"] != pytest.approx(results(sweep)[k]["score"], abs=1e-3) for k, line in lines.items()
    )
    report = bench("report", out)
    assert report.exit_code == 0, report.output
    assert "best-of-n" in report.output


def test_prefixes_are_the_first_tokens_and_a_mismatch_is_marked(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "".join(WORDS[:5])  # five tokens
    scores = [[2, 0.1], [4, 0.2], [5, 0.3], [6, 0.4]]
    # stopped by the end of sequence (counted in tokens) right after the 4th budget: it saw the whole text
    texts, faithful = prefix_texts(tok, {"text": text, "tokens": 6, "finished": True, "scores": scores})
    assert texts == [" the a", " the a of to", text, text] and faithful
    _, faithful = prefix_texts(tok, {"text": text, "tokens": 7, "finished": False, "scores": scores})
    assert not faithful  # generated 7 tokens that re-encode into 5
    _, faithful = prefix_texts(tok, {"text": text + "\ufffd", "tokens": 6, "finished": False, "scores": []})
    assert not faithful  # a character cut between tokens


def test_bad_input_is_one_line(sweep, tmp_path):
    cases = [
        (["--pools", tmp_path / "none.jsonl", "--model", sweep.parent / "canonical", "--out", tmp_path / "o"],
         "no such file"),
        (["--pools", sweep / "pools.jsonl", "--model", tmp_path / "missing", "--out", tmp_path / "o"],
         "model path not found"),
        (["--pools", sweep / "pools.jsonl", "--model", sweep.parent / "canonical", "--out", sweep],
         "another folder"),
        (["--pools", sweep / "pools.jsonl", "--out", tmp_path / "o"], "required"),
    ]  # fmt: skip
    for args, message in cases:
        res = bench("rescore", *args)
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "pools.jsonl").write_text((sweep / "pools.jsonl").read_text())  # no runs.jsonl beside it
    res = bench(
        "rescore",
        "--pools",
        lone / "pools.jsonl",
        "--model",
        sweep.parent / "canonical",
        "--out",
        tmp_path / "o",
    )
    assert res.exit_code == 2 and "give --dataset" in res.output


def test_the_replay_never_generates(sweep, tmp_path):
    """A question without a pool (an interrupted sweep) is left out; a sweep whose pools were drawn with
    other options is not replayed (a rescore generates nothing)."""
    model = sweep.parent / "canonical"
    part = tmp_path / "part"
    part.mkdir()
    (part / "pools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in list(pools(sweep).values())[:2]))
    (part / "runs.jsonl").write_text((sweep / "runs.jsonl").read_text())
    res = bench("rescore", "--pools", part / "pools.jsonl", "--model", model, "--out", tmp_path / "o1")
    assert res.exit_code == 0, res.output
    assert "1 question(s) of the sweep" in res.output and "left out" in res.output
    assert len(results(tmp_path / "o1")) == len(results(sweep)) * 2 // 3
    run = json.loads((sweep / "runs.jsonl").read_text().splitlines()[0])
    run["options"]["seed"] = 7  # another pool
    (part / "runs.jsonl").write_text(json.dumps(run) + "\n")
    res = bench("rescore", "--pools", part / "pools.jsonl", "--model", model, "--out", tmp_path / "o2")
    assert res.exit_code == 0, res.output
    assert "stopped replaying the sweep" in res.output and not results(tmp_path / "o2")
