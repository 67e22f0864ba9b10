"""Self-evaluation scoring one example at a time (right-padded batches) against one packed forward per
prompt, on the same model and examples.

    python -m sgl_adaptive.bench.packed_scoring [--model DIR] [--dtype auto] [--device cpu] --data DIR
        [--prompts 2] [--batch-tokens 8192] [--json]

Reads the examples of the first ``--prompts`` prompts of ``DATA/train.jsonl`` (a ``finetune data``
folder), scores them with ``scoring.score_examples`` and with ``packing.score_packed`` (after one
untimed warm-up example each), and reports per scorer the examples, the tokens forwarded (unpacked:
the sum of the example lengths, plus the padded total its batches forward; packed: the sizes of the
prompts' token tries), the wall time, tokens/s and examples/s; then the speed-up (unpacked time over
packed time) and the largest |score difference| between the two scorers (float rounding only: ~1e-6
in fp32, up to ~0.02 in bf16, whose body rounds differently in a packed row).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False)


def first_prompts(examples: list[dict[str, Any]], prompts: int) -> list[dict[str, Any]]:
    """The examples of the first ``prompts`` prompts (``packing.group_by_prompt``), in file order."""
    from sgl_adaptive.finetune.packing import group_by_prompt

    keep = sorted(i for group in group_by_prompt(examples)[:prompts] for i in group)
    return [examples[i] for i in keep]


def padded_tokens(encoder: Any, examples: list[dict[str, Any]], batch_tokens: int) -> int:
    """Tokens ``score_examples`` forwards with its right padding (rows x longest row, per batch)."""
    from sgl_adaptive.finetune.scoring import _batches

    lengths = [len(encoder.prompt_ids(ex["prompt"], ex["text"])) for ex in examples]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return sum(
        len(b) * max(lengths[i] for i in b) for b in _batches(order, lengths, batch_tokens, max_rows=32)
    )


def measure(
    model: Any, encoder: Any, examples: list[dict[str, Any]], *, batch_tokens: int = 8192
) -> dict[str, Any]:
    """Both scorers on ``examples``: per-scorer figures, the speed-up and the max |score difference|."""
    from sgl_adaptive.finetune.packing import packed_token_counts, score_packed
    from sgl_adaptive.finetune.scoring import score_examples

    counts = packed_token_counts(encoder, examples)
    score_examples(model, encoder, examples[:1])  # warm-up: first-call allocations, kernel choice
    score_packed(model, encoder, examples[:1])
    start = time.perf_counter()
    unpacked = score_examples(model, encoder, examples, batch_tokens=batch_tokens)
    unpacked_s = time.perf_counter() - start
    start = time.perf_counter()
    packed = score_packed(model, encoder, examples)
    packed_s = time.perf_counter() - start

    def figures(tokens: int, seconds: float) -> dict[str, Any]:
        return {
            "examples": len(examples),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "examples_per_s": len(examples) / seconds,
        }

    return {
        "unpacked": {
            **figures(counts["unpacked_tokens"], unpacked_s),
            "padded_tokens": padded_tokens(encoder, examples, batch_tokens),
        },
        "packed": figures(counts["packed_tokens"], packed_s),
        "speedup": unpacked_s / packed_s,
        "max_score_diff": max(abs(a.score - b.score) for a, b in zip(unpacked, packed, strict=True)),
    }


def run(
    model: str | None,
    data: Path,
    prompts: int,
    *,
    dtype: str = "auto",
    device: str | None = None,
    batch_tokens: int = 8192,
) -> dict[str, Any]:
    """Load the model and the examples, ``measure``; the report with model, dtype, device and prompts."""
    from sgl_adaptive.backends.precision import default_dtype, parse_dtype
    from sgl_adaptive.data import read_jsonl
    from sgl_adaptive.devices import check_device
    from sgl_adaptive.errors import UserError
    from sgl_adaptive.finetune.packing import group_by_prompt
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, default_device, load_causal_lm
    from sgl_adaptive.model_store import resolve_model

    if prompts < 1:
        raise UserError(f"--prompts must be at least 1 (got {prompts})")
    check_device(device)
    device = device or default_device()
    try:
        torch_dtype = parse_dtype(dtype) or default_dtype(device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    path = data / "train.jsonl"
    if not path.is_file():
        raise UserError(f"{data} has no train.jsonl (run `sgl-adaptive finetune data` first)")
    examples = first_prompts(list(read_jsonl(path)), prompts)
    if not examples:
        raise UserError(f"{path} has no examples")
    model_path = resolve_model(model, base=True)
    lm, tokenizer = load_causal_lm(model_path, device=device, dtype=torch_dtype)
    report = {
        "model": model_path,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": device,
        "prompts": len(group_by_prompt(examples)),
    }
    return {**report, **measure(lm, SelfEvalEncoder(tokenizer), examples, batch_tokens=batch_tokens)}


def format_report(report: dict[str, Any]) -> list[str]:
    """The plain-text lines of a ``run`` report."""
    lines = [
        f"model {report['model']} ({report['dtype']}, {report['device']}), {report['prompts']} prompts, "
        f"{report['unpacked']['examples']} examples"
    ]
    for name in ("unpacked", "packed"):
        r = report[name]
        padded = f" ({r['padded_tokens']:,} with padding)" if "padded_tokens" in r else ""
        lines.append(
            f"{name:>8}: {r['tokens']:,} tokens{padded}, {r['seconds']:.2f} s, "
            f"{r['tokens_per_s']:,.0f} tok/s, {r['examples_per_s']:.2f} examples/s"
        )
    fewer = report["unpacked"]["tokens"] / report["packed"]["tokens"]
    lines.append(
        f"speed-up {report['speedup']:.2f}x, {fewer:.2f}x fewer tokens; "
        f"max |score difference| {report['max_score_diff']:.2e}"
    )
    return lines


@app.command()
def main(
    data: Annotated[Path, typer.Option(help="Directory written by `finetune data` (its train.jsonl).")],
    model: Annotated[str | None, typer.Option(help="Model (default: the embedded 0.5B base).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    prompts: Annotated[int, typer.Option(help="Score the examples of the first N prompts.")] = 2,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per batch of the unpacked scorer.")] = 8192,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    from sgl_adaptive.errors import UserError

    try:
        report = run(model, data, prompts, dtype=dtype, device=device, batch_tokens=batch_tokens)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report))
        return
    for line in format_report(report):
        typer.echo(line)


if __name__ == "__main__":
    app()
