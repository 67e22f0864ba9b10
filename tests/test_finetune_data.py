"""``finetune data``: on-policy sampling through the library's program, determinism under a seed,
resuming, the held-out split by prompt, provenance, reward sources and the GSM8K train/dev split."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sgl_adaptive.cli import app
from sgl_adaptive.errors import UserError

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prompts_file(path, n):
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i + 2}?"}) + "\n" for i in range(n))
    )
    return path


def data(tiny_model_dir, prompts, out, *extra):
    args = ["finetune", "data", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out)]
    args += ["--reward", "regex:[79]", "-k", "3", "--max-new-tokens", "6", "--truncate", "2,4", *extra]
    return runner.invoke(app, args)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_data_is_deterministic_resumable_and_split_by_prompt(tiny_model_dir, tmp_path):
    prompts = prompts_file(tmp_path / "p.jsonl", 6)
    fresh = data(tiny_model_dir, prompts, tmp_path / "fresh", "--heldout-fraction", "0.3")
    assert fresh.exit_code == 0, fresh.output
    # resume: 3 prompts, then all 6 (after an interrupted write left a torn line)
    assert (
        data(tiny_model_dir, prompts, tmp_path / "res", "--limit", "3", "--heldout-fraction", "0.3").exit_code
        == 0
    )
    with (tmp_path / "res" / "samples.jsonl").open("a") as f:
        f.write('{"id": "q3", "prompt": "torn')
    resumed = data(tiny_model_dir, prompts, tmp_path / "res", "--heldout-fraction", "0.3")
    assert resumed.exit_code == 0, resumed.output
    for name in ("samples.jsonl", "train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "fresh" / name).read_text() == (tmp_path / "res" / name).read_text(), name

    samples = lines(tmp_path / "fresh" / "samples.jsonl")
    assert [r["id"] for r in samples] == [f"q{i}" for i in range(6)]
    assert all(len(r["samples"]) == 3 for r in samples)
    assert len({s["text"] for r in samples for s in r["samples"]}) > 6  # samples differ
    train, held = lines(tmp_path / "fresh" / "train.jsonl"), lines(tmp_path / "fresh" / "heldout.jsonl")
    assert held and train
    assert not {e["prompt_id"] for e in train} & {e["prompt_id"] for e in held}
    for e in train + held:
        assert e["label"] in ("No", "Yes") and e["wins"] + e["ties"] + e["losses"] == 2
        assert e["truncated_tokens"] in (None, 2, 4) and e["response"].startswith(e["text"])
        assert e["provenance"]["model"] == str(tiny_model_dir.resolve())
        assert e["provenance"]["reward"] == "regex:[79]" and e["provenance"]["sampling"]["temperature"] == 0.7
    assert {e["label"] for e in train + held} == {"No", "Yes"}
    manifest = json.loads((tmp_path / "fresh" / "manifest.json").read_text())
    assert manifest["generation"]["sampling"]["seed"] == 0 and manifest["counts"]["prompts"] == 6

    # another seed draws other samples; other settings in the same directory are refused in one line
    other = data(tiny_model_dir, prompts, tmp_path / "seed1", "--seed", "1")
    assert other.exit_code == 0
    assert (tmp_path / "seed1" / "samples.jsonl").read_text() != (
        tmp_path / "fresh" / "samples.jsonl"
    ).read_text()
    clash = data(tiny_model_dir, prompts, tmp_path / "fresh", "--temperature", "1.0")
    assert clash.exit_code == 2 and "other settings (sampling differ)" in clash.output


def test_relabel_without_resampling_and_errors(tiny_model_dir, tmp_path):
    prompts = prompts_file(tmp_path / "p.jsonl", 3)
    assert data(tiny_model_dir, prompts, tmp_path / "d").exit_code == 0
    before = (tmp_path / "d" / "samples.jsonl").read_text()
    wide = data(tiny_model_dir, prompts, tmp_path / "d", "--tie-margin", "2", "--truncate", "")
    assert wide.exit_code == 0, wide.output
    assert (tmp_path / "d" / "samples.jsonl").read_text() == before
    examples = lines(tmp_path / "d" / "train.jsonl") + lines(tmp_path / "d" / "heldout.jsonl")
    assert {e["label"] for e in examples} == {"No"} and {e["truncated_tokens"] for e in examples} == {None}

    res = runner.invoke(
        app,
        [
            "finetune",
            "data",
            "--model",
            str(tiny_model_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "v"),
        ],
    )
    assert res.exit_code == 2 and "no reference answer" in res.output
    res = data(tiny_model_dir, prompts, tmp_path / "k", "-k", "1")
    assert res.exit_code == 2 and "at least 2" in res.output


def test_gsm8k_records_use_the_project_prompt_and_exclude_the_bench_dev_split(tmp_path):
    from sgl_adaptive.data import split_records
    from sgl_adaptive.finetune.prompts import load_prompts
    from sgl_adaptive.finetune.rewards import VerifierReward

    records = [
        {"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i} + 2\n#### {i + 2}"}
        for i in range(60)
    ]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train = load_prompts(str(path))
    dev_questions = {r["question"] for r in split_records(records, "question", 0.1)[1]}
    assert dev_questions and len(train) == 60 - len(dev_questions)
    assert not any(q in it.prompt for it in train for q in dev_questions)
    item = train[0]
    assert "The answer is N" in item.prompt and item.kind == "gsm8k"
    n = int(item.reference)
    assert VerifierReward()(item, [f"so the answer is {n}.", "The answer is 1,000.", f"\\boxed{{{n}}}"]) == [
        1.0,
        0.0,
        1.0,
    ]
    assert len(load_prompts(str(path), part="dev")) == len(dev_questions)
    with pytest.raises(UserError, match="no reference"):
        VerifierReward()(load_prompts(str(prompts_file(tmp_path / "p.jsonl", 1)))[0], ["1"])


def test_reward_model_source(tiny_model_dir, tmp_path):
    """A tiny sequence-classification reward model: its rewards label the samples with 0.1 x std as margin."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=640,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    rm_dir = tmp_path / "rm"
    Qwen2ForSequenceClassification(config).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    prompts = prompts_file(tmp_path / "p.jsonl", 3)
    res = runner.invoke(
        app,
        [
            "finetune",
            "data",
            "--model",
            str(tiny_model_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "d"),
            "--reward",
            f"rm:{rm_dir}",
            "-k",
            "3",
            "--max-new-tokens",
            "5",
            "--truncate",
            "",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.output.strip().splitlines()[-1])
    rewards = [s["reward"] for r in lines(tmp_path / "d" / "samples.jsonl") for s in r["samples"]]
    assert len(set(rewards)) > 1 and manifest["generation"]["reward"] == f"rm:{rm_dir}"
    std = float(torch.tensor(rewards).std(unbiased=False))
    assert manifest["labels"]["tie_margin"] == pytest.approx(0.1 * std, rel=1e-6)


def test_workers_batch_prompts_in_process_and_stay_deterministic(tiny_model_dir, tmp_path):
    """Several prompts in flight on one in-process backend: the samples do not depend on the worker
    count (request seeds hash the base seed and the prompt text), and a resume completes the file."""
    prompts = prompts_file(tmp_path / "p.jsonl", 5)
    two = data(tiny_model_dir, prompts, tmp_path / "w2", "--workers", "2")
    assert two.exit_code == 0, two.output
    assert data(tiny_model_dir, prompts, tmp_path / "w3", "--workers", "3", "--limit", "2").exit_code == 0
    assert data(tiny_model_dir, prompts, tmp_path / "w3", "--workers", "3").exit_code == 0

    def by_id(path):
        return {r["id"]: r["samples"] for r in lines(path / "samples.jsonl")}

    assert by_id(tmp_path / "w2") == by_id(tmp_path / "w3") and len(by_id(tmp_path / "w2")) == 5
    bad = data(tiny_model_dir, prompts, tmp_path / "w0", "--workers", "0")
    assert bad.exit_code != 0 and "--workers must be at least 1" in bad.output


def test_data_through_an_sglang_endpoint(backend, tiny_model_dir, tmp_path):
    """The server path: samples drawn through SGLang's HTTP API (served here by the in-process engine),
    several prompts in flight; the policy's tokenizer comes from the served model path."""
    from sgl_adaptive.backends.http_server import serve

    srv = serve(backend, port=0)
    try:
        prompts = prompts_file(tmp_path / "p.jsonl", 4)
        res = runner.invoke(app, ["finetune", "data", "--endpoint", f"http://127.0.0.1:{srv.server_address[1]}",
                                  "--prompts", str(prompts), "--out", str(tmp_path / "d"), "--reward", "regex:[79]",
                                  "-k", "2", "--max-new-tokens", "5", "--truncate", "2", "--workers", "2"])  # fmt: skip
    finally:
        srv.shutdown()
    assert res.exit_code == 0, res.output
    records = lines(tmp_path / "d" / "samples.jsonl")
    assert sorted(r["id"] for r in records) == ["q0", "q1", "q2", "q3"]
    assert all(len(r["samples"]) == 2 and all(s["text"] for s in r["samples"]) for r in records)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["generation"]["model"] == manifest["tokenizer"] == str(tiny_model_dir)


def test_data_and_eval_print_progress_lines_when_stderr_is_not_a_terminal(tiny_model_dir, tmp_path):
    """CliRunner's stderr is not a terminal, like ``2> log`` or a CI log: rich would draw nothing until
    the end, so the commands print plain lines as they go (every tenth here)."""
    prompts = prompts_file(tmp_path / "p.jsonl", 6)
    made = data(tiny_model_dir, prompts, tmp_path / "d", "--heldout-fraction", "0.5")
    assert made.exit_code == 0, made.output
    sampling = [line for line in made.stderr.splitlines() if line.startswith("sampling prompts: ")]
    assert sampling[0].startswith("sampling prompts: 1/6 prompts (17%), ") and len(sampling) == 6, sampling
    assert sampling[-1].startswith("sampling prompts: 6/6 prompts (100%), ")

    args = [
        "finetune",
        "eval",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "d"),
        "--base",
        "none",
    ]
    scored = runner.invoke(app, [*args, "--dtype", "float32", "--batch-tokens", "64", "--json"])
    assert scored.exit_code == 0, scored.output
    examples = json.loads(scored.stdout.strip().splitlines()[-1])["data"]["examples"]
    lines_ = scored.stderr.splitlines()
    assert "loading the model …" in lines_
    scoring = [line for line in lines_ if line.startswith("scoring the model: ")]
    assert len(scoring) >= 2 and scoring[-1].startswith(
        f"scoring the model: {examples}/{examples} examples (100%)"
    )
