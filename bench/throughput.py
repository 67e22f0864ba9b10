"""Decode throughput of the in-process backend at several batch sizes, beside ``model.generate``.

    python -m sgl_adaptive.bench.throughput [--model DIR] [--dtype auto] [--batches 1,8] [--tokens 64] [--repeats 3]
        [--compare-generate]

Submits B identical-prompt requests at once (as a B-way fork does) with the end of turn ignored,
and reports generated tokens per second over all rows (median of the repeats). With
``--compare-generate`` the same model in the same process also runs transformers' ``generate`` at
batch B with its KV cache (sampling at the same temperature, end of turn ignored): its decode rate is
B x (tokens - 1) over the time of a ``tokens``-token call minus that of a 1-token call (the prefill),
so both figures count decode steps only (the engine's prompt is in its prefix cache, as after a fork).
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


def measure_generate(backend, batch: int, tokens: int) -> float:
    """Decode tokens per second of ``model.generate`` at batch ``batch`` (prefill time subtracted)."""
    import torch

    prompt = backend.chat_template.get_prompt(
        [{"role": "user", "content": "Tell me a long story about the sea."}]
    )
    prompt += backend.chat_template.role_prefix_and_suffix["assistant"][0]
    ids = torch.tensor([backend.tokenizer.encode(prompt, add_special_tokens=False)] * batch)
    ids = ids.to(backend.model.device)

    def timed(new: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            backend.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                temperature=0.7,
                top_p=1.0,
                top_k=0,
                use_cache=True,
                pad_token_id=backend.tokenizer.pad_token_id or 0,
            )
        return time.perf_counter() - start

    decode = timed(tokens) - timed(1)
    return batch * (tokens - 1) / decode


@app.command()
def main(
    model: Annotated[str | None, typer.Option(help="Model (default: the embedded 0.5B model).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16.")] = "auto",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    tokens: Annotated[int, typer.Option(help="New tokens per row.")] = 64,
    repeats: Annotated[int, typer.Option(help="Repeats per batch size (median reported).")] = 3,
    compare_generate: Annotated[
        bool, typer.Option(help="Also time transformers' generate at each batch size (same model).")
    ] = False,
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
    if compare_generate:
        for b in results:
            rates = [measure_generate(backend, b, tokens) for _ in range(repeats)]
            rate = statistics.median(rates)
            typer.echo(
                f"generate batch {b:3d}: {rate:7.2f} tok/s (median of {repeats}: "
                f"{', '.join(f'{r:.2f}' for r in rates)}); engine / generate: {results[b] / rate:.2f}x"
            )
    backend.shutdown()


if __name__ == "__main__":
    app()
