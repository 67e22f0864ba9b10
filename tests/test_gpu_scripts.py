"""The GPU stage scripts (scripts/gpu): syntax, the step dispatcher, the stage clock, the server-flag filter,
``tools.py``, and one serve -> data -> stop round against the in-process server on the tiny model.

The device itself is not needed: ``SERVER=inprocess`` makes ``device.sh serve`` start ``sgl-adaptive serve``
through the same setsid / stamped-log / health-poll path as SGLang's server."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "scripts" / "gpu"
DEVICE_SH = GPU / "device.sh"


def load_tools():
    spec = importlib.util.spec_from_file_location("gpu_tools", GPU / "tools.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


tools = load_tools()


def device(tmp_path: Path, *steps: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    base = {
        "OUT": str(tmp_path / "out"),
        "STATE": str(tmp_path / "state"),
        "WORK": str(tmp_path / "work"),
        "PKG": str(tmp_path / "pkg"),
        "PYTHONPATH": str(tmp_path / "pkg"),
        "PY": sys.executable,
        "SERVER": "inprocess",
        "DEVICE": "cpu",
    }
    full = {**os.environ, **base, **env}
    return subprocess.run(
        ["bash", str(DEVICE_SH), *steps], env=full, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", sorted(p.name for p in GPU.glob("*.sh")))
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(GPU / script)], check=True)


def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    r = device(tmp_path, "chunk", "nosuch")
    assert r.returncode == 2
    assert "unknown step nosuch" in r.stdout
    assert not (tmp_path / "out" / "timeline.tsv").exists()


def test_the_stage_clock_caps_steps(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "deadline").write_text(f"{int(time.time()) + 150}\n")
    r = device(tmp_path, "clock", PKG_LAYOUT="0")
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if "stage:" in x)
    left = int(line.split("stage: ")[1].split(" s left")[0])
    assert 145 <= left <= 150
    granted = int(line.rsplit("gets ", 1)[1].split(" s")[0])
    assert left - 100 - 2 <= granted <= left - 100  # 480 s wanted, 100 s kept for what follows
    assert (tmp_path / "out" / "timeline.tsv").read_text().startswith("clock\t")


def test_server_flags_keep_only_what_this_sglang_knows(tmp_path):
    src = tmp_path / "fake-sglang"
    (src / "srt" / "arg_groups").mkdir(parents=True)
    (src / "srt" / "server_args.py").write_text(
        'parser.add_argument("--disable-cuda-graph", action="store_true")\n'
        "class ServerArgs:\n    enable_fp32_lm_head: bool = False\n    skip_server_warmup: bool = False\n"
    )
    r = device(tmp_path, "flags", PKG_LAYOUT="0", SERVER="sglang", SGLANG_SRC=str(src))
    assert r.returncode == 0, r.stdout + r.stderr
    flags = next(x for x in r.stdout.splitlines() if "server flags:" in x).split("server flags: ")[1].split()
    for f in ("--attention-backend", "--enable-fp32-lm-head", "--skip-server-warmup", "--disable-cuda-graph"):
        assert f in flags
    assert "--sampling-defaults" not in flags and "this SGLang has no --sampling-defaults" in r.stdout
    r = device(
        tmp_path,
        "flags",
        PKG_LAYOUT="0",
        SERVER="sglang",
        SGLANG_SRC=str(src),
        FP32_HEAD="0",
        CUDA_GRAPH_MAX_BS="8",
    )
    flags = next(x for x in r.stdout.splitlines() if "server flags:" in x).split("server flags: ")[1].split()
    assert "--enable-fp32-lm-head" not in flags and "--disable-cuda-graph" not in flags
    assert flags[flags.index("--cuda-graph-max-bs") + 1] == "8"


def test_server_timeline_names_the_phases_and_the_longest_silences(tmp_path):
    log = tmp_path / "server.log"
    t = 1000.0
    lines = [
        (t + 12.0, "server_args=ServerArgs(model_path='/tmp/qwen05b')"),
        (t + 14.0, "Load weight begin. avail mem=139 GB"),
        (t + 16.5, "Load weight end. type=Qwen2ForCausalLM"),
        (t + 17.0, "KV Cache is allocated. #tokens: 100000"),
        (t + 90.0, "flashinfer JIT: compiled norm"),
        (t + 95.0, "Uvicorn running on http://127.0.0.1:30000"),
        (t + 96.0, "The server is fired up and ready to roll!"),
    ]
    log.write_text("".join(f"{a:.6f} {b}\n" for a, b in lines) + "unstamped line\n")
    rows = {r[0]: r for r in tools.server_timeline(log, t, t + 97.0)}
    assert rows["first log line (imports done)"][1] == "12.0"
    assert rows["load weight end"][1] == "16.5"
    assert rows["JIT / compile (first line)"][1] == "90.0"
    assert rows["healthy"][1] == "97.0"
    silences = [r for r in tools.server_timeline(log, t, None) if r[0] == "silence before"]
    assert silences[0][1] == "73.0" and "JIT" in silences[0][2]
    assert tools.server_timeline(log, t, None)[-len(silences) - 1] == ["healthy", "never", ""]


def test_distinct_scores_per_question(tmp_path):
    def cand(*scores):
        return {"scores": [[t, s] for t, s in scores]}

    pools = tmp_path / "pools.jsonl"
    recs = [
        {
            "key": "q1:pool:x",
            "candidates": [
                cand((16, 0.5), (100, 0.9)),
                cand((16, 0.5), (80, 0.9)),
                cand((16, 0.25), (90, 0.7)),
            ],
        },
        {"key": "q2:pool:x", "candidates": [cand((100, 0.1)), cand((90, 0.2)), cand((95, 0.3))]},
        {"key": "q3:judge:y", "scores": [0.1]},
    ]
    pools.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"torn')
    report = tools.distinct_scores(pools, "yes")
    assert report["final"]["questions"] == 2
    assert report["final"]["histogram"] == {"2": 1, "3": 1}
    assert report["by_eval_tokens"]["16"]["histogram"] == {"2": 1}
    assert report["samples_per_question"] == {3: 2}


def test_jsonl_lines_split_on_newlines_only(tmp_path):
    text = "line one\u2028still one\x85and\x0cone"  # str.splitlines() would cut these
    for name, opener in (("s.jsonl", open), ("s.jsonl.gz", gzip.open)):
        with opener(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write(
                json.dumps({"id": "a", "t": text}, ensure_ascii=False) + "\n" + json.dumps({"id": "b"}) + "\n"
            )
        rows = [json.loads(x) for x in tools._read_lines(tmp_path / name)]
        assert [r["id"] for r in rows] == ["a", "b"] and rows[0]["t"] == text
    pools = tmp_path / "pools.jsonl"
    cands = [{"text": text, "scores": [[9, 0.5]]}, {"text": "x", "scores": [[9, 0.25]]}]
    pools.write_text(json.dumps({"key": "q:pool:p", "candidates": cands}, ensure_ascii=False) + "\n")
    assert tools.distinct_scores(pools)["final"]["histogram"] == {"2": 1}


def test_sanitize_manifest_replaces_device_paths(tmp_path):
    src, ref, dst = tmp_path / "m.json", tmp_path / "ref.json", tmp_path / "out.json"
    src.write_text(
        json.dumps(
            {
                "generation": {"model": "/tmp/qwen05b", "prompts": {"prompts": "/tmp/data/g.jsonl"}},
                "tokenizer": "/tmp/qwen05b",
                "counts": {"prompts": 9},
            }
        )
    )
    ref.write_text(
        json.dumps(
            {
                "generation": {"model": "Qwen (bf16)", "prompts": {"prompts": "../shared/g.jsonl"}},
                "tokenizer": "the same model",
            }
        )
    )
    out = tools.sanitize_manifest(src, dst, ref)
    assert out["generation"]["model"] == "Qwen (bf16)"
    assert out["generation"]["prompts"]["prompts"] == "../shared/g.jsonl"
    assert out["tokenizer"] == "the same model" and out["counts"] == {"prompts": 9}
    assert "/tmp" not in dst.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_then_data_grows_the_seed_samples(tmp_path, tiny_model_dir):
    prompts = tmp_path / "gsm8k-train.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"})
            + "\n"
            for i in range(40)
        )
    )
    seed = tmp_path / "seed.jsonl.gz"
    seed.write_bytes(gzip.compress(b""))
    env = dict(
        BASE=str(tiny_model_dir),
        PROMPTS=str(prompts),
        PORT=str(free_port()),
        K="2",
        MAX_NEW="6",
        WORKERS="2",
        OMP_NUM_THREADS="1",
    )
    out = tmp_path / "out"
    first = device(tmp_path, "serve", "data", timeout=300, SEED_SAMPLES=str(seed), DATA_ADD="2", **env)
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        grown = gzip.decompress((out / "samples.jsonl.gz").read_bytes()).decode().splitlines()
        assert len(grown) == 2
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["prompts"] == 2 and manifest["last_run"]["sampled"] == 2
        assert manifest["generation"]["sampling"]["seed"] == 0
        start = {
            r.split("\t")[0]: r.split("\t")[1]
            for r in (out / "server-start.tsv").read_text().split("\n")[1:]
            if r
        }
        assert float(start["healthy"]) > 0
        assert (
            float(start["ready (healthy + first request)"])
            >= float(start["first /generate after healthy"])
            >= 0
        )
        timeline = (out / "timeline.tsv").read_text().splitlines()
        assert [x.split("\t")[0] for x in timeline] == ["serve", "data"]
        # A second stage resumes from those samples: the server is reused, the first two lines stay.
        seed.write_bytes((out / "samples.jsonl.gz").read_bytes())
        second = device(
            tmp_path / "again",
            "serve",
            "data",
            timeout=300,
            SEED_SAMPLES=str(seed),
            DATA_ADD="1",
            STATE=str(tmp_path / "state"),
            **env,
        )
        assert second.returncode == 0, second.stdout + second.stderr
        assert "server already healthy" in second.stdout
        again = gzip.decompress((tmp_path / "again" / "out" / "samples.jsonl.gz").read_bytes()).decode()
        assert again.splitlines()[:2] == grown and len(again.splitlines()) == 3
    finally:
        device(tmp_path, "stop", PKG_LAYOUT="0")
