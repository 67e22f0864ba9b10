"""Small helpers of the GPU stages (standard library, except seed-check and warm-jit; run by ``device.sh``
and ``land.sh``).

python3 scripts/gpu/tools.py server-timeline LOG LAUNCH_EPOCH HEALTHY_EPOCH OUT.tsv
python3 scripts/gpu/tools.py distinct-scores POOLS.jsonl OUT.json [--fp32-lm-head yes|no|unknown]
python3 scripts/gpu/tools.py seed-check SAMPLES.jsonl[.gz] PROMPTS.jsonl     (needs sgl_adaptive importable)
python3 scripts/gpu/tools.py sanitize-manifest IN.json OUT.json [REFERENCE.json]
python3 scripts/gpu/tools.py first-request URL [--timeout 300]
python3 scripts/gpu/tools.py warm-jit [--hidden 896]                            (on the GPU, needs torch)
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# First occurrence of each of these in the (time-stamped) SGLang server log marks a phase of the start.
MILESTONES: tuple[tuple[str, str], ...] = (
    ("server args parsed", r"server_args="),
    ("load weight begin", r"Load weight begin"),
    ("load weight end", r"Load weight end"),
    ("KV cache allocated", r"KV Cache is allocated|Memory pool end"),
    ("cuda graph capture begin", r"Capture cuda graph begin|Capture .*cuda graph.* begin"),
    ("cuda graph capture end", r"Capture cuda graph end|Capture .*cuda graph.* end"),
    ("JIT / compile (first line)", r"\bJIT\b|[Cc]ompil|Building|ninja"),
    ("max_total_num_tokens", r"max_total_num_tokens"),
    ("uvicorn running", r"Uvicorn running|Application startup complete"),
    ("warm-up done / ready", r"fired up and ready|End of prefill warmup"),
)


def _stamped(path: Path) -> list[tuple[float, str]]:
    """Lines ``EPOCH.frac text`` (as device.sh's stamper writes them); unstamped lines are skipped."""
    out = []
    for raw in path.read_text(errors="replace").split("\n"):
        head, _, text = raw.partition(" ")
        try:
            out.append((float(head.replace(",", ".")), text))
        except ValueError:
            continue
    return out


def server_timeline(log: Path, launch: float, healthy: float | None, gaps: int = 8) -> list[list[str]]:
    """Rows (what, seconds since launch, log line) for the start-up phases and the longest silences."""
    lines = _stamped(log)
    rows = [["launch", "0.0", ""]]
    if lines:
        rows.append(["first log line (imports done)", f"{lines[0][0] - launch:.1f}", lines[0][1][:200]])
    for name, pattern in MILESTONES:
        rx = re.compile(pattern)
        hit = next(((t, text) for t, text in lines if rx.search(text)), None)
        if hit:
            rows.append([name, f"{hit[0] - launch:.1f}", hit[1][:200]])
    rows.append(["healthy", f"{healthy - launch:.1f}" if healthy else "never", ""])
    # Where the time went even when no milestone matches: the longest silences before a line.
    spans = [(lines[i][0] - lines[i - 1][0], lines[i][1]) for i in range(1, len(lines))]
    for span, text in sorted(spans, key=lambda s: -s[0])[:gaps]:
        rows.append(["silence before", f"{span:.1f}", text[:200]])
    return rows


def distinct_scores(pools: Path, fp32_lm_head: str = "unknown") -> dict[str, Any]:
    """Per question of a sweep's pools.jsonl: how many distinct self-evaluation scores its N samples got,
    at their ends and at each evaluation budget (ties decide the pick when this is small)."""
    final: list[int] = []
    by_budget: dict[int, list[int]] = {}
    n_samples: Counter[int] = Counter()
    for line in pools.read_text().split("\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        cands = rec.get("candidates")
        if not isinstance(cands, list) or not cands:
            continue
        n_samples[len(cands)] += 1
        ends = {round(float(c["scores"][-1][1]), 12) for c in cands if c.get("scores")}
        final.append(len(ends))
        at: dict[int, set[float]] = {}
        for c in cands:
            for tokens, score in c.get("scores", [])[:-1]:
                at.setdefault(int(tokens), set()).add(round(float(score), 12))
        for budget, values in at.items():
            by_budget.setdefault(budget, []).append(len(values))

    def summary(counts: list[int]) -> dict[str, Any]:
        if not counts:
            return {"questions": 0}
        return {
            "questions": len(counts),
            "mean": round(sum(counts) / len(counts), 3),
            "min": min(counts),
            "max": max(counts),
            "histogram": {str(k): v for k, v in sorted(Counter(counts).items())},
        }

    return {
        "fp32_lm_head": fp32_lm_head,
        "samples_per_question": dict(sorted(n_samples.items())),
        "final": summary(final),
        "by_eval_tokens": {str(b): summary(v) for b, v in sorted(by_budget.items())},
    }


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    # split on "\n" only: the model's texts hold U+2028 and the like, which str.splitlines() also splits on
    with opener(path, "rt", encoding="utf-8", newline="") as handle:  # type: ignore[operator]
        return [line for line in handle.read().split("\n") if line.strip()]


def seed_check(samples: Path, prompts: Path) -> int:
    """0 when the seed samples are exactly the first N prompts of the shuffled (seed 0) train part, so
    ``finetune data --shuffle --seed 0 --limit N`` finds nothing to sample (relabel only)."""
    from sgl_adaptive.finetune.prompts import load_prompts

    ids = [json.loads(line)["id"] for line in _read_lines(samples)] if samples.stat().st_size else []
    items = load_prompts(
        str(prompts),
        split="train",
        config=None,
        part="train",
        prompt_field=None,
        limit=len(ids) or 1,
        shuffle_seed=0,
    )
    want = [it.id for it in items][: len(ids)]
    if set(ids) == set(want):
        print(f"seed-check: the {len(ids)} seed prompts are the first {len(ids)} of the shuffled train part")
        return 0
    print(
        f"seed-check: {len(set(ids) - set(want))} of {len(ids)} seed prompts are not among the first {len(ids)}"
    )
    return 1


def sanitize_manifest(src: Path, dst: Path, reference: Path | None = None) -> dict[str, Any]:
    """The device's manifest with its machine paths replaced by the names the committed data uses
    (taken from ``reference``, the previous manifest of the data folder, when given)."""
    manifest = json.loads(src.read_text())
    ref = json.loads(reference.read_text()) if reference and reference.is_file() else {}
    gen = manifest.setdefault("generation", {})
    ref_gen = ref.get("generation", {})
    model = ref_gen.get("model") or (
        "Qwen2.5-Coder-0.5B-Instruct (the embedded default: Q4_K_M GGUF converted to bf16), served by SGLang"
    )
    gen["model"] = model
    prompts = gen.get("prompts", {})
    if isinstance(prompts, dict) and prompts.get("prompts"):
        prompts["prompts"] = ref_gen.get("prompts", {}).get("prompts") or "../shared/data/gsm8k-train.jsonl"
    manifest["tokenizer"] = ref.get("tokenizer", "the same model")
    dst.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def first_request(url: str, timeout: float = 300.0) -> float:
    """Seconds one 4-token greedy /generate takes right after /health first answered. With
    --skip-server-warmup (and no CUDA graphs) the kernels' JIT builds move from the start into this first
    request, so the start is only honest with it counted."""
    import time
    import urllib.request

    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0.0}}
    req = urllib.request.Request(
        url.rstrip("/") + "/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.time()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
    return time.time() - start


def warm_jit(hidden: int = 896) -> int:
    """Run the RMSNorm kernels the server's first forward pass needs, so their JIT build (flashinfer's,
    through sgl_kernel on 0.5.17) happens now, in the background of the chunk transfers, and lands in
    the JIT cache. Each kernel is tried on its own; a failure is printed, never raised."""
    import time

    start = time.time()
    import torch

    try:
        x = torch.randn(8, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    except Exception as exc:
        print(f"no GPU: {type(exc).__name__}: {str(exc)[:200]}")
        return 0
    calls = []
    try:
        import sgl_kernel

        calls += [("sgl_kernel.rmsnorm", lambda: sgl_kernel.rmsnorm(x, w, 1e-6))]
        calls += [
            (
                "sgl_kernel.fused_add_rmsnorm",
                lambda: sgl_kernel.fused_add_rmsnorm(x.clone(), x.clone(), w, 1e-6),
            )
        ]
    except Exception as exc:
        print("no sgl_kernel:", exc)
    try:
        import flashinfer.norm as fn

        calls += [("flashinfer.norm.rmsnorm", lambda: fn.rmsnorm(x, w, 1e-6))]
        calls += [
            ("flashinfer.norm.fused_add_rmsnorm", lambda: fn.fused_add_rmsnorm(x.clone(), x.clone(), w, 1e-6))
        ]
    except Exception as exc:
        print("no flashinfer:", exc)
    for name, call in calls:
        t = time.time()
        try:
            call()
            torch.cuda.synchronize()
            print(f"{name}: ok in {time.time() - t:.1f} s", flush=True)
        except Exception as exc:
            print(f"{name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    print(f"warm-jit done in {time.time() - start:.1f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("server-timeline")
    p.add_argument("log", type=Path)
    p.add_argument("launch", type=float)
    p.add_argument("healthy", help="epoch seconds, or 'never'")
    p.add_argument("out", type=Path)
    p = sub.add_parser("distinct-scores")
    p.add_argument("pools", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--fp32-lm-head", default="unknown")
    p = sub.add_parser("seed-check")
    p.add_argument("samples", type=Path)
    p.add_argument("prompts", type=Path)
    p = sub.add_parser("first-request")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=300.0)
    p = sub.add_parser("warm-jit")
    p.add_argument("--hidden", type=int, default=896)
    p = sub.add_parser("sanitize-manifest")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("reference", type=Path, nargs="?")
    args = parser.parse_args(argv)

    if args.cmd == "server-timeline":
        healthy = None if args.healthy == "never" else float(args.healthy)
        rows = server_timeline(args.log, args.launch, healthy)
        args.out.write_text("what\tseconds\tlog line\n" + "".join("\t".join(r) + "\n" for r in rows))
        for what, seconds, text in rows:
            print(f"  {seconds:>7}  {what:<30} {text[:100]}")
        return 0
    if args.cmd == "distinct-scores":
        report = distinct_scores(args.pools, args.fp32_lm_head)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["final"]))
        return 0
    if args.cmd == "seed-check":
        return seed_check(args.samples, args.prompts)
    if args.cmd == "first-request":
        try:
            print(f"{first_request(args.url, args.timeout):.1f}")
        except Exception as exc:
            print(f"failed: {type(exc).__name__}: {str(exc)[:200]}")
            return 1
        return 0
    if args.cmd == "warm-jit":
        return warm_jit(args.hidden)
    if args.cmd == "sanitize-manifest":
        sanitize_manifest(args.src, args.dst, args.reference)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
