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


def test_run_and_batch_build_the_same_config_from_the_same_options(monkeypatch, tmp_path):
    """One MethodConfig builder (``cli_options.method_config``): the options both commands share reach the
    config the same way (the method is never run: the config is caught on its way in)."""
    import sgl_adaptive.batch
    import sgl_adaptive.cli
    from sgl_adaptive.errors import UserError

    seen = []

    def caught(config):
        seen.append(config)
        raise UserError("caught")

    monkeypatch.setattr(sgl_adaptive.cli, "backend_loader", lambda *a, **k: lambda: None)
    monkeypatch.setattr(sgl_adaptive.cli, "run", lambda text, backend, method, config, **k: caught(config))
    monkeypatch.setattr(
        sgl_adaptive.batch, "run_batch_file", lambda src, out, b, settings, **k: caught(settings.config)
    )
    shared = ["--n", "3", "--max-new-tokens", "7", "--temperature", "0.5", "--top-p", "0.9", "--seed", "4"]
    shared += ["--scorer", "confidence", "--confidence-window", "8", "--selector", "weighted-majority"]
    shared += ["--vote-temperature", "0.5", "--stop", "esc", "--stop-window", "2", "--anneal", "none"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    assert "caught" in invoke("run", "hi", "--method", "adaptive", *shared).output
    batch = [
        "batch",
        str(prompts),
        "--budget",
        "3",
        "--out",
        str(tmp_path / "o.jsonl"),
        "--method",
        "adaptive",
    ]
    assert "caught" in invoke(*batch, *shared).output
    run_config, batch_config = seen
    assert run_config == batch_config
    assert (run_config.n, run_config.scorer, run_config.confidence_window, run_config.stop_window) == (
        3,
        "confidence",
        8,
        2,
    )


def test_version_is_pyprojects_and_the_cli_prints_it():
    import re
    from pathlib import Path

    import sgl_adaptive

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (declared,) = re.findall(r'^version = "([^"]+)"$', text, flags=re.M)
    assert sgl_adaptive.__version__ == declared  # a stale install would differ: reinstall
    res = invoke("--version")
    assert res.exit_code == 0 and res.output == f"sgl-adaptive {declared}\n"
