"""The packed-scoring benchmark: both scorers on the same examples, their figures and their agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_packing import _examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def data_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path / "data"
    out.mkdir()
    examples = _examples(AutoTokenizer.from_pretrained(tiny_model_dir))
    (out / "train.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    return out


def test_benchmark_reports_both_scorers_and_they_agree_in_fp32(tiny_model_dir: Path, data_dir: Path):
    from sgl_adaptive.bench.packed_scoring import app, format_report

    examples = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    first = [ex for ex in examples if ex["prompt_id"] == examples[0]["prompt_id"]]
    args = ["--model", str(tiny_model_dir), "--data", str(data_dir), "--dtype", "float32", "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--prompts", "1", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["prompts"] == 1 and report["dtype"] == "float32" and report["device"] == "cpu"
    unpacked, packed = report["unpacked"], report["packed"]
    assert unpacked["examples"] == packed["examples"] == len(first)
    assert 0 < packed["tokens"] < unpacked["tokens"] <= unpacked["padded_tokens"]
    for r in (unpacked, packed):
        assert r["seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["examples_per_s"] == pytest.approx(r["examples"] / r["seconds"])
    assert report["speedup"] == pytest.approx(unpacked["seconds"] / packed["seconds"])
    assert report["max_score_diff"] < 1e-4
    assert "speed-up" in "\n".join(format_report(report))

    text = CliRunner().invoke(app, args)  # default --prompts 2: both prompts of the folder
    assert text.exit_code == 0, text.output
    assert f"2 prompts, {len(examples)} examples" in text.output and "packed:" in text.output


def test_benchmark_refuses_a_folder_without_train_examples(tiny_model_dir: Path, tmp_path: Path):
    from sgl_adaptive.bench.packed_scoring import app

    res = CliRunner().invoke(app, ["--model", str(tiny_model_dir), "--data", str(tmp_path)])
    assert res.exit_code == 2 and "no train.jsonl" in res.output
