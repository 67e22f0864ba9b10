"""Decode throughput of the in-process backend at several batch sizes.

    python -m sgl_adaptive.bench.throughput [--model DIR] [--dtype auto] [--batches 1,8] [--tokens 64] [--repeats 3]

Submits B identical-prompt requests at once (as a B-way fork does) with the end of turn ignored,
and reports generated tokens per second over all rows (median of the repeats).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Annotated

import typer
from sglang.lang.ir import SglSamplingParams

app = typer.Typer(add_completion=False)


def measure(backend, batch: int, tokens: int) -> float:
    prompt = backend.chat_template.get_prompt(
        [{"role": "user", "content": "Tell me a long story about the sea."}]
    )
    prompt += backend.chat_template.role_prefix_and_suffix["assistant"][0]
    backend.complete(prompt, SglSamplingParams(max_new_tokens=0))  # prompt cached, as after a fork
    sp = SglSamplingParams(max_new_tokens=tokens, temperature=0.7, ignore_eos=True)
    done: list[int] = []
    start = time.perf_counter()
    threads = [
        threading.Thread(target=lambda: done.append(backend.complete(prompt, sp)[1]["completion_tokens"]))
        for _ in range(batch)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


@app.command()
def main(
    model: Annotated[str | None, typer.Option(help="Model (default: the embedded 0.5B model).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16.")] = "auto",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    tokens: Annotated[int, typer.Option(help="New tokens per row.")] = 64,
    repeats: Annotated[int, typer.Option(help="Repeats per batch size (median reported).")] = 3,
) -> None:
    from sgl_adaptive.runner import load_backend

    backend = load_backend(model, None, dtype=dtype)
    typer.echo(f"model dtype: {backend.model.dtype}")
    results = {}
    for b in (int(x) for x in batches.split(",")):
        rates = [measure(backend, b, tokens) for _ in range(repeats)]
        results[b] = statistics.median(rates)
        typer.echo(
            f"batch {b:3d}: {results[b]:7.2f} tok/s (median of {repeats}: {', '.join(f'{r:.2f}' for r in rates)})"
        )
    base = results.get(min(results))
    for b, rate in results.items():
        typer.echo(f"batch {b:3d} / batch {min(results)}: {rate / base:.2f}x")
    backend.shutdown()


if __name__ == "__main__":
    app()
