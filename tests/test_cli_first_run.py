"""A new user's first runs: fast argument errors, one-line errors, prompt files and stdin, progress."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_adaptive.cli import app

runner = CliRunner()


def invoke(*args: str, stdin: str | None = None):
    return runner.invoke(app, list(args), input=stdin, env={"COLUMNS": "300"})


def one_line_error(res, *needles: str) -> str:
    """The output is exactly one ``error:`` line containing every needle, with exit code 2."""
    text = res.output.strip()
    lines = [line for line in text.splitlines() if not line.startswith("Loading weights")]
    assert res.exit_code == 2, text
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    for needle in needles:
        assert needle in lines[0], text
    return lines[0]


def test_importing_the_cli_imports_no_torch_sglang_or_transformers():
    code = (
        "import sys, sgl_adaptive.cli, sgl_adaptive.bench.cli\n"
        "heavy = [m for m in ('torch', 'sglang', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from sgl_adaptive import LocalBackend, read_prompt, run\n"
        "assert 'torch' in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_a_missing_model_path_is_reported_before_torch_is_imported():
    """Without torch importable, a bad --model path must still be the error reported."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['sglang'] = None\n"
        "from sgl_adaptive.cli import app\n"
        "app(['run', 'hi', '--model', '/nonexistent/model', '--device', 'cpu'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "error: model path not found: /nonexistent/model"


def test_device_cuda_without_a_gpu(tiny_model_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = invoke("run", "hi", "--model", str(tiny_model_dir), "--device", "cuda")
    one_line_error(res, "--device cuda", "no CUDA GPU")
    one_line_error(invoke("run", "hi", "--device", "tpu"), "unknown device 'tpu'")


def test_tokenizer_without_single_token_yes_no(tmp_path):
    from sgl_adaptive.tiny_model import build_tiny_model

    # A byte-level vocabulary without merges (256 bytes + 3 specials): "Yes" and "No" take 2-3 tokens.
    model = build_tiny_model(tmp_path / "no-answer-tokens", vocab_size=259)
    res = invoke("run", "hi", "--model", str(model), "--n", "2", "--max-new-tokens", "4")
    one_line_error(res, "no single-token 'Yes' or 'No'")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "best-of-n", "--keep", "5", "--n", "2"], "--keep is not used by best-of-n"),
        (["--method", "adaptive", "--prune-at", "64"], "--prune-at is not used by adaptive"),
        (["--method", "prune", "--threshold", "0.9"], "--threshold is not used by prune"),
        (["--method", "greedy", "--n", "4"], "--n is not used by greedy"),
        (["--method", "prune", "--keep", "5", "--n", "2"], "--keep must not exceed --n"),
        (["--method", "adaptive-prune", "--keep", "5", "--n", "2"], "--keep must not exceed --n"),
    ],
)
def test_options_the_method_does_not_read_or_keep_above_n(args, needle):
    # The model path does not exist: the option check must come first.
    one_line_error(invoke("run", "hi", "--model", "/nonexistent/model", *args), needle)


def test_failed_bench_removes_the_out_folder_it_created(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    out = tmp_path / "new-out"
    res = invoke("bench", "--model", "/nonexistent/model", "--dataset", str(data), "--out", str(out))
    one_line_error(res, "model path not found")
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    res = invoke("bench", "--model", "/nonexistent/model", "--dataset", str(data), "--out", str(existing))
    one_line_error(res, "model path not found")
    assert (existing / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", [["run"], ["serve"], ["bench"]])
def test_dtype_help_lists_every_accepted_dtype(command):
    res = invoke(*command, "--help")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for name in ("auto", "float32", "bfloat16", "float16"):
        assert re.search(rf"\b{name}\b", text), (name, text)


def test_float16_is_accepted_and_other_dtypes_are_not():
    from sgl_adaptive.runner import DTYPES, check_dtype

    assert "float16" in DTYPES
    check_dtype("float16")
    one_line_error(invoke("run", "hi", "--dtype", "float64"), "unknown dtype 'float64'")


def test_prompt_from_a_file_and_from_stdin(tiny_model_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is 2 + 3?\n")
    common = ["--model", str(tiny_model_dir), "--method", "greedy", "--max-new-tokens", "4", "--json"]
    from_file = invoke("run", "--prompt-file", str(prompt), *common)
    from_stdin = invoke("run", "-", *common, stdin="What is 2 + 3?\n")
    from_arg = invoke("run", "What is 2 + 3?", *common)
    answers = [json.loads(r.stdout)["answer"] for r in (from_file, from_stdin, from_arg)]
    assert answers[0] == answers[1] == answers[2]


def test_prompt_file_errors(tmp_path):
    one_line_error(invoke("run", "--prompt-file", str(tmp_path / "missing.txt")), "No such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    one_line_error(invoke("run", "--prompt-file", str(empty)), "is empty")
    one_line_error(invoke("run", "-", stdin=""), "standard input is empty")
    one_line_error(invoke("run", "hi", "--prompt-file", str(empty)), "not both")
    one_line_error(invoke("run"), "no prompt")


def test_a_50000_word_prompt_reaches_the_context_check(tiny_model_dir, tmp_path):
    words = " ".join(["seven"] * 50_000)
    path = tmp_path / "long.txt"
    path.write_text(words)
    common = ["--model", str(tiny_model_dir), "--method", "greedy", "--max-new-tokens", "4"]
    one_line_error(invoke("run", "--prompt-file", str(path), *common), "the model's context is 2048 tokens")
    one_line_error(invoke("run", "-", *common, stdin=words), "the model's context is 2048 tokens")


def test_progress_goes_to_stderr_and_json_stays_one_object(tiny_model_dir):
    res = invoke(
        "run",
        "What is 2 + 3?",
        "--model",
        str(tiny_model_dir),
        "--method",
        "adaptive",
        "--n",
        "4",
        "--threshold",
        "1.0",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["batches"] == 3 and res.stdout.count("\n") == 1
    for line in ("round 1: sampling", "round 3: sampling", "sample 4: ", "score 0."):
        assert line in res.stderr, res.stderr


def test_result_to_json_is_a_json_string_and_to_dict_a_dict(backend):
    from sgl_adaptive import run

    result = run("What is 2 + 3?", backend, "best-of-n", n=2, max_new_tokens=4)
    assert isinstance(result.to_json(), str) and "\n" not in result.to_json()
    assert json.loads(result.to_json()) == result.to_dict()
    assert isinstance(result.candidates[0].to_dict(), dict)


def test_read_prompt_in_the_api(tmp_path):
    from sgl_adaptive import UserError, read_prompt

    path = Path(tmp_path / "q.txt")
    path.write_text("What is 2 + 3?\r\n")
    assert read_prompt(path) == read_prompt(str(path)) == "What is 2 + 3?"
    with pytest.raises(UserError, match="cannot read"):
        read_prompt(tmp_path / "missing.txt")


def test_progress_in_the_api_names_each_sample_once(backend):
    from sgl_adaptive import MethodConfig
    from sgl_adaptive.programs import PROGRAMS
    from sgl_adaptive.runner import run_program

    lines: list[str] = []
    # Temperature 0: both samples are the same text, yet each evaluation is reported for its own sample.
    # (The program itself: ``run`` answers temperature 0 with one greedy sample.)
    config = MethodConfig(n=2, temperature=0.0, threshold=1.0)
    run_program(PROGRAMS["adaptive"], "What is 2 + 3?", backend, config, "adaptive", progress=lines.append)
    assert [line.split(":")[0].strip() for line in lines] == [
        "round 1",
        "sample 1",
        "sample 1",
        "round 2",
        "sample 2",
        "sample 2",
    ], lines


def test_one_status_line_at_a_time_while_the_model_builds_and_loads(tiny_model_dir, monkeypatch):
    """The model build's own progress (download, conversion) is never shown inside a second spinner."""
    import contextlib

    from sgl_adaptive import cli, model_store

    depth, deepest, messages = [0], [0], []

    @contextlib.contextmanager
    def status(message, *args, **kwargs):
        messages.append(message)
        depth[0] += 1
        deepest[0] = max(deepest[0], depth[0])
        try:
            yield
        finally:
            depth[0] -= 1

    def building(spec, console=None, **kwargs):
        with console.status("fetching part 1/6 …"):
            return str(tiny_model_dir)

    monkeypatch.setattr(cli.err, "status", status)
    monkeypatch.setattr(model_store, "resolve_model", building)
    res = runner.invoke(app, ["run", "What is 1 + 1?", "--method", "greedy", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert messages[:2] == ["fetching part 1/6 …", "loading the model …"] and deepest[0] == 1, messages
