"""``sgl-adaptive bench`` end to end on the tiny model and a 4-question fixture: every method, reruns,
a killed run resumed, sweep mode, the endpoint path, general prompts and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_adaptive.bench.store import read_lines
from sgl_adaptive.cli import app

runner = CliRunner()
ALL = "greedy,best-of-n,rm-best-of-n,judge-best-of-n,majority,oracle,adaptive,prune,adaptive-prune"
COSTS = (
    "samples",
    "batches",
    "generated_tokens",
    "prefill_tokens",
    "cached_tokens",
    "self_evals",
    "eval_prefill_tokens",
    "critical_path_tokens",
    "flops",
    "wall_s",
    "rm_tokens",
    "rm_flops",
)


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "four.jsonl"
    rows = [
        {"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}
        for a, b in [(2, 3), (10, 4), (7, 1), (6, 6)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench(*args: str):
    return runner.invoke(app, ["bench", *args])


def results(out: Path) -> list[dict]:
    return list(read_lines(out / "results.jsonl"))


def test_every_method_writes_well_formed_lines_and_a_rerun_generates_nothing(
    tiny_model_dir, questions, reward_model_dir, tmp_path
):
    args = [
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(questions),
        "--out",
        str(tmp_path),
        "--methods",
        ALL,
    ]
    args += ["--n", "2", "--max-new-tokens", "8", "--reward-model", str(reward_model_dir)]
    res = bench(*args)
    assert res.exit_code == 0, res.output
    lines = results(tmp_path)
    assert len(lines) == 4 * 9 and len({x["key"] for x in lines}) == 36
    for x in lines:
        assert x["mode"] == "live" and x["quality"] in (0.0, 1.0) and isinstance(x["response"], str)
        assert set(COSTS) <= set(x["costs"]) and x["costs"]["flops"] > 0 and x["costs"]["wall_s"] >= 0
    by = {(x["qid"], x["method"]): x for x in lines}
    q = lines[0]["qid"]
    assert by[q, "greedy"]["costs"]["samples"] == 1 and by[q, "greedy"]["costs"]["self_evals"] == 0
    assert by[q, "best-of-n"]["costs"]["self_evals"] == 2
    assert by[q, "judge-best-of-n"]["costs"]["self_evals"] == 2
    rm = by[q, "rm-best-of-n"]["costs"]
    assert rm["rm_tokens"] > 0 and rm["rm_flops"] > 0 and rm["self_evals"] == 0
    assert rm["rm_reads"] == rm["samples"] == 2  # the reward model read every sample once
    assert by[q, "majority"]["costs"]["rm_reads"] == 0  # the shared draw itself carries no reads
    # majority, oracle and rm-best-of-n share one draw of N samples per question
    assert by[q, "majority"]["costs"]["generated_tokens"] == by[q, "oracle"]["costs"]["generated_tokens"]
    assert rm["flops"] == pytest.approx(by[q, "majority"]["costs"]["flops"] + rm["rm_flops"])
    assert by[q, "prune"]["config"]["keep"] == 1 and by[q, "prune"]["config"]["prune_at"] == 4
    for name in ("summary.md", "accuracy_vs_samples.png", "accuracy_vs_flops.png", "pruning.png"):
        assert (tmp_path / name).is_file()
    assert "rm-best-of-n" in res.output and "% max" in res.output

    before = (tmp_path / "results.jsonl").read_bytes()
    again = bench(*args)
    assert again.exit_code == 0, again.output
    assert "nothing to run" in again.output
    assert (tmp_path / "results.jsonl").read_bytes() == before

    (tmp_path / "summary.md").unlink()
    report = bench("report", str(tmp_path))
    assert report.exit_code == 0 and (tmp_path / "summary.md").is_file()
    assert "adaptive-prune" in report.output


def test_a_killed_run_resumes_with_exactly_one_line_per_item(tiny_model_dir, questions, tmp_path):
    args = ["--model", str(tiny_model_dir), "--dataset", str(questions), "--out", str(tmp_path)]
    args += ["--methods", "greedy,best-of-n,adaptive", "--n", "4", "--max-new-tokens", "48"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgl_adaptive.cli", "bench", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    path = tmp_path / "results.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(results(tmp_path))
    assert done >= 2
    with path.open("a") as handle:  # as if the kill had landed in the middle of a write
        handle.write('{"key": "0-x:greedy:abc", "kind": "res')
    res = bench(*args)
    assert res.exit_code == 0, res.output
    if done < 12:
        assert f"{12 - done} runs to do" in res.output
    lines = results(tmp_path)
    assert len(lines) == 12 and len({x["key"] for x in lines}) == 12
    assert len({(x["qid"], x["method"]) for x in lines}) == 12


def test_sweep_computes_curves_from_one_pool_and_resumes(
    tiny_model_dir, questions, reward_model_dir, tmp_path
):
    args = [
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(questions),
        "--out",
        str(tmp_path),
        "--methods",
        ALL,
    ]
    args += ["--mode", "sweep", "--n", "4", "--max-new-tokens", "8", "--budgets", "2,4"]
    args += ["--threshold", "0.5,1.0", "--reward-model", str(reward_model_dir)]
    res = bench(*args)
    assert res.exit_code == 0, res.output
    pools = list(read_lines(tmp_path / "pools.jsonl"))
    assert sorted(p["kind"] for p in pools) == ["judge"] * 4 + ["pool"] * 4 + ["rm"] * 4
    pool = next(p for p in pools if p["kind"] == "pool")
    assert len(pool["candidates"]) == 4 and pool["prompt_tokens"] > 0 and pool["eval_tokens"] > 0
    assert pool["candidates"][0]["temperature"] == 0.0  # annealed: the first sample is greedy
    lines = results(tmp_path)
    # greedy + 5 best-of-k families x k in (1, 2, 4) + 2 thresholds + 2 budgets x 2 keeps + 2 adaptive-prune
    assert len(lines) == 4 * (1 + 15 + 2 + 4 + 2)
    assert all(x["mode"] == "sweep" and x["costs"]["estimated"] for x in lines)
    never = [x for x in lines if x["method"] == "adaptive" and x["config"]["threshold"] == 1.0]
    assert all(x["costs"]["samples"] == 4 and x["costs"]["batches"] == 3 for x in never)
    assert "Sweep: every row" in res.output
    # the pictures: PNG and SVG, their points the table's accuracy and average samples
    from sgl_adaptive.bench.report import load_results, row_cells, section_plots, summarize

    for name in ("accuracy_vs_samples", "accuracy_vs_flops", "pruning"):
        assert (tmp_path / f"{name}.png").is_file() and (tmp_path / f"{name}.svg").is_file()
    (section,) = summarize(load_results(tmp_path))
    (panel,) = section_plots(section)["accuracy_vs_samples"].panels
    points = {(f"{y:.1f}%", f"{x:.2f}") for c in panel.curves for x, y in zip(c.x, c.y, strict=True)}
    shown = [r for r in section.rows if r.method in {c.label.split()[0] for c in panel.curves}]
    assert points == {(row_cells(r, "accuracy")[3], row_cells(r, "accuracy")[5]) for r in shown}
    assert {c.label for c in panel.curves} == {"greedy", "best-of-n", "majority", "adaptive", "oracle"}
    again = bench(*args)
    assert "nothing to run" in again.output and len(results(tmp_path)) == len(lines)


def test_bench_against_a_server_url_with_parallel_questions(backend, questions, tmp_path):
    from sgl_adaptive.backends.http_server import serve

    server = serve(backend, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        res = bench(
            "--endpoint", url, "--dataset", str(questions), "--out", str(tmp_path), "--parallel", "2",
            "--methods", "greedy,best-of-n,majority", "--n", "2", "--max-new-tokens", "6",
        )  # fmt: skip
    finally:
        server.shutdown()
    assert res.exit_code == 0, res.output
    lines = results(tmp_path)
    assert len(lines) == 12 and {x["model"] for x in lines} == {Path(backend.model_path).name}
    assert all(x["costs"]["samples"] >= 1 for x in lines)


def test_general_prompts_are_judged_by_the_reward_model(tiny_model_dir, reward_model_dir, tmp_path):
    data = tmp_path / "general.jsonl"
    data.write_text('{"prompt": "Say hello.", "reference": "Hello!"}\n{"prompt": "Count to three."}\n')
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--out", str(tmp_path / "out")]
    res = bench(*args, "--methods", "greedy,best-of-n,oracle", "--n", "2", "--max-new-tokens", "6",
                "--judge-model", str(reward_model_dir))  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = results(tmp_path / "out")
    assert len(lines) == 6 and all(x["task"] == "general" and x["correct"] is None for x in lines)
    with_ref = [x for x in lines if x["index"] == 0]
    assert all(x["quality"] in (0.0, 0.5, 1.0) for x in with_ref)  # preference against the reference
    assert "quality" in res.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "nosuchset"], "unknown dataset"),
        (["--dataset", "BAD"], "bad.jsonl:2: malformed JSON"),
        (["--endpoint", "URL"], "cannot reach the SGLang server"),
        (["--n", "0"], "--n must be at least 1"),
        (["--parallel", "0"], "--parallel must be at least 1"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--methods", "greedy,beam"], "unknown method 'beam'"),
        (["--threshold", "1.5"], "--threshold must be within [0, 1]"),
        (["--threshold", "high"], "--threshold: expected floats"),
        (["--methods", "prune", "--n", "2", "--keep", "3"], "--keep must be within"),
        (["--methods", "prune", "--prune-at", "512"], "--prune-at must be below"),
        (["--methods", "rm-best-of-n"], "needs --reward-model"),
        (["--mode", "fast"], "--mode must be live or sweep"),
        (["--methods", "budget-matched"], "budget-matched runs in sweep mode only: use --mode sweep"),
        (["--mode", "sweep", "--methods", "adaptive-no-anneal"], "runs in live mode only: use --mode live"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
    ],
)
def test_bad_input_is_one_line(questions, tmp_path, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{"question": \n')
    args = ["--dataset", str(questions), "--out", str(tmp_path / "out"), "--model", "/nonexistent/model"]
    for i, value in enumerate(extra):
        extra[i] = {"BAD": str(bad), "URL": f"http://127.0.0.1:{free_port()}"}.get(value, value)
    if "--endpoint" in extra:
        args = args[:-2]
    res = bench(*args, *extra)
    text = res.output.strip()
    assert res.exit_code == 2, text
    assert text.startswith("error:") and len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert message in text


def test_missing_options_and_empty_report_folder(tmp_path):
    for args in (["--out", str(tmp_path)], ["--dataset", "gsm8k-dev"], ["report", str(tmp_path)]):
        res = bench(*args)
        assert res.exit_code == 2 and res.output.startswith("error:") and len(res.output.splitlines()) == 1


def test_the_help_lists_every_bench_method():
    """``ALL_METHODS`` (the help text, kept import-light) is exactly ``bench.methods.METHODS``."""
    from sgl_adaptive.bench.cli import ALL_METHODS
    from sgl_adaptive.bench.methods import METHODS

    assert ALL_METHODS.split(",") == list(METHODS)


def test_throughput_bench_compares_the_engine_with_generate(tiny_model_dir):
    """The decode-speed comparison runs end to end (figures only mean something on the real model)."""
    from sgl_adaptive.bench.throughput import app as throughput_app

    res = CliRunner().invoke(
        throughput_app,
        ["--model", str(tiny_model_dir), "--dtype", "float32", "--batches", "1,2", "--tokens", "4",
         "--repeats", "1", "--compare-generate"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "batch   2" in res.output and res.output.count("engine / generate") == 2


def test_sweep_replays_the_training_free_scorers_from_the_pool(tiny_model_dir, questions, tmp_path):
    """The pool records the training-free scores beside the self-evaluations, so a sweep replays
    Best-of-N by confidence and by self-certainty without a new generation or any evaluation."""
    methods = "best-of-n,confidence-best-of-n,self-certainty-best-of-n"
    res = bench("--model", str(tiny_model_dir), "--dataset", str(questions), "--out", str(tmp_path),
                "--methods", methods, "--mode", "sweep", "--n", "4", "--max-new-tokens", "8", "--budgets", "4")  # fmt: skip
    assert res.exit_code == 0, res.output
    pool = next(p for p in read_lines(tmp_path / "pools.jsonl") if p["kind"] == "pool")
    for c in pool["candidates"]:
        assert set(c["free_scores"]) == {"confidence", "self-certainty"}
        assert [t for t, _ in c["free_scores"]["confidence"]] == [t for t, _ in c["scores"]]
    lines = results(tmp_path)
    by_method = {m: [x for x in lines if x["method"] == m] for m in methods.split(",")}
    assert all(by_method.values()), {m: len(v) for m, v in by_method.items()}
    for m in ("confidence-best-of-n", "self-certainty-best-of-n"):
        assert all(x["costs"]["self_evals"] == 0 for x in by_method[m])
    assert any(x["costs"]["self_evals"] > 0 for x in by_method["best-of-n"])


def test_budget_matched_replays_the_pool_within_the_tokens_prune_spent(tiny_model_dir, questions, tmp_path):
    """The compute-matched control for pruning, from the tiny model's pools: for every prune_at x keep,
    the most whole pool samples (in draw order) that fit in prune's generated tokens, picked by argmax of
    their final self-evaluations."""
    res = bench("--model", str(tiny_model_dir), "--dataset", str(questions), "--out", str(tmp_path),
                "--methods", "best-of-n,prune,budget-matched", "--mode", "sweep", "--n", "4",
                "--max-new-tokens", "8", "--budgets", "2,4")  # fmt: skip
    assert res.exit_code == 0, res.output
    pools = {p["qid"]: p for p in read_lines(tmp_path / "pools.jsonl") if p["kind"] == "pool"}
    lines = results(tmp_path)
    matched = [x for x in lines if x["method"] == "budget-matched"]
    assert len(matched) == 4 * 2 * 2  # questions x budgets (2, 4) x keeps (1, 2)
    prunes = {
        (x["qid"], x["config"]["prune_at"], x["config"]["keep"]): x for x in lines if x["method"] == "prune"
    }
    for x in matched:
        spent = prunes[x["qid"], x["config"]["prune_at"], x["config"]["keep"]]["costs"]["generated_tokens"]
        candidates = pools[x["qid"]]["candidates"]
        tokens = [c["tokens"] for c in candidates]
        finals = [c["scores"][-1][1] for c in candidates]
        m = x["drawn"]
        assert x["matched_tokens"] == spent and x["costs"]["samples"] == m
        assert x["costs"]["generated_tokens"] == sum(tokens[:m])
        assert sum(tokens[:m]) <= spent or m == 1
        assert m == len(tokens) or sum(tokens[: m + 1]) > spent
        assert x["chosen"] == max(range(m), key=lambda i: (finals[i], -i))
    assert "budget-matched" in res.output and (tmp_path / "pruning.png").is_file()
    assert "budget-matched: best-of-m" in (tmp_path / "summary.md").read_text()
