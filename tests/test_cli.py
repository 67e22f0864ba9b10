"""The command line: JSON output, human output and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sgl_adaptive.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_run_json_prints_exactly_one_object(tiny_model_dir):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sgl_adaptive.cli",
            "run",
            "What is 2 + 3?",
            "--model",
            str(tiny_model_dir),
            "--method",
            "prune",
            "--n",
            "4",
            "--keep",
            "2",
            "--prune-at",
            "4",
            "--max-new-tokens",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert res.stdout.strip().count("\n") == 0
    assert out["method"] == "prune" and out["samples"] == 4 and len(out["candidates"]) == 4
    for key in ("answer", "batches", "tokens", "self_evals", "eval_prefill", "flops", "wall_s"):
        assert key in out


def test_run_human_output_has_answer_and_cost_line(tiny_model_dir):
    res = invoke(
        "run",
        "Hello",
        "--model",
        str(tiny_model_dir),
        "--method",
        "adaptive",
        "--n",
        "2",
        "--max-new-tokens",
        "6",
    )
    assert res.exit_code == 0, res.output
    assert "samples 2 in 2 batches" in res.output or "samples 1 in 1 batches" in res.output


@pytest.mark.parametrize(
    "args",
    [
        ["run", "   "],
        ["run", "hi", "--n", "0"],
        ["run", "hi", "--threshold", "1.5"],
        ["run", "hi", "--method", "prune", "--n", "2", "--keep", "3"],
        ["run", "hi", "--method", "beam"],
        ["run", "hi", "--dtype", "int8"],
        ["run", "hi", "--model", "/nonexistent/model"],
        ["run", "hi", "--model", "a", "--endpoint", "http://127.0.0.1:1"],
    ],
)
def test_bad_input_is_one_line_without_traceback(args):
    res = invoke(*args)
    assert res.exit_code != 0
    text = res.output.strip()
    assert "Traceback" not in text
    assert text.startswith("error:") and len(text.splitlines()) == 1, text


def test_unreachable_endpoint(tmp_path):
    res = invoke("run", "hi", "--endpoint", "http://127.0.0.1:9")
    assert res.exit_code != 0
    assert "cannot reach the SGLang server" in res.output and "Traceback" not in res.output


def test_model_directory_without_config(tmp_path):
    res = invoke("run", "hi", "--model", str(tmp_path))
    assert res.exit_code != 0 and "config.json" in res.output
