"""``sgl-adaptive bench``: quality against compute, method against method.

sgl-adaptive bench (--model PATH | --endpoint URL) --dataset NAME_OR_FILE --out DIR [options]
sgl-adaptive bench report DIR
sgl-adaptive bench rescore --pools DIR/pools.jsonl --model MODEL --out DIR2 [--dtype] [--device]
sgl-adaptive bench figures --samples SAMPLES.jsonl.gz --scores A.scores.jsonl.gz [--scores B...] --out DIR
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sgl_adaptive.cli_options import DeviceOption, DtypeOption
from sgl_adaptive.devices import check_device
from sgl_adaptive.errors import ProgramError, UserError
from sgl_adaptive.runner import check_dtype

app = typer.Typer(
    help=(
        "Benchmark methods: quality against compute. Results go to DIR/results.jsonl, one line per "
        "question x method x config; rerunning the same command resumes. `bench report DIR` re-prints."
    ),
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)

ALL_METHODS = (
    "greedy,best-of-n,confidence-best-of-n,self-certainty-best-of-n,rm-best-of-n,judge-best-of-n,majority,oracle,weighted-majority,adaptive,"
    "adaptive-consistency,esc,deepconf,prune,adaptive-prune,adaptive-no-anneal,best-of-n-anneal,random-prune,budget-matched"
)
"""Every bench method (``bench.methods.METHODS``, which a test keeps equal), for the help without the import."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def parse_list(value: str | None, kind: type, option: str) -> list | None:
    """``"0.9,0.98"`` -> [0.9, 0.98]; a bad entry is a one-line error."""
    if value is None:
        return None
    try:
        items = [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option}: expected {kind.__name__}s separated by commas (got {value!r})") from None
    if not items:
        raise UserError(f"{option} is empty")
    return items


@app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(help="HF model dir, GGUF file or hub name (default: the embedded 0.5B model)."),
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="URL of a running SGLang server (or an sglang-router).")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="gsm8k, gsm8k-dev, math-500, a HF name org/name, or a .jsonl file."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for results.jsonl, summary.md and the plots.")
    ] = None,
    methods: Annotated[
        str,
        typer.Option(help=f"Comma-separated, or 'all' (every method the --mode runs): {ALL_METHODS}."),
    ] = ("greedy,best-of-n,adaptive,prune"),
    n: Annotated[int, typer.Option(help="Sample budget N.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Token budget per sample.")] = 512,
    mode: Annotated[
        str, typer.Option(help="live: run each method; sweep: one scored pool per question, curves offline.")
    ] = "live",
    limit: Annotated[int | None, typer.Option(help="First N questions (in the dataset's order).")] = None,
    split: Annotated[
        str | None, typer.Option(help="Dataset split (gsm8k: test; gsm8k-dev: dev or train; math-500: test).")
    ] = None,
    parallel: Annotated[int, typer.Option(help="Questions run concurrently.")] = 1,
    threshold: Annotated[
        str | None,
        typer.Option(
            help="Adaptive thresholds, comma-separated (live default 0.98; sweep: a grid 0.5 … 1.0)."
        ),
    ] = None,
    prune_at: Annotated[
        str | None,
        typer.Option(
            help="Pruning budgets in tokens, comma-separated (live default: 64 or 128; sweep: all)."
        ),
    ] = None,
    keep: Annotated[
        str | None, typer.Option(help="Samples kept after pruning, comma-separated (live default N/4).")
    ] = None,
    budgets: Annotated[
        str, typer.Option(help="Sweep: token budgets at which the pool is self-evaluated.")
    ] = "16,32,64,128,256",
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    anneal: Annotated[
        str, typer.Option(help="Temperature annealing (adaptive methods; the sweep pool): paper or none.")
    ] = "paper",
    seed: Annotated[int, typer.Option(help="Seed of the in-process backend.")] = 0,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    reward_model: Annotated[
        str | None, typer.Option(help="HF reward model (sequence classification) for rm-best-of-n.")
    ] = None,
    judge_model: Annotated[
        str | None,
        typer.Option(help="HF reward model that grades general prompts (default: --reward-model)."),
    ] = None,
    judge_prompt: Annotated[
        str | None, typer.Option(help="Question of the zero-shot judge (judge-best-of-n).")
    ] = None,
    data_root: Annotated[
        str | None, typer.Option(help="Folder holding gsm8k-train.jsonl (default: ../shared/data).")
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="Override the task detected from the fields: gsm8k, math, general.")
    ] = None,
) -> None:
    """Run METHODS on a dataset and report accuracy against samples, batches, tokens, FLOPs and wall time.

    Results are appended to DIR/results.jsonl, one line per question x method x config; a rerun of the
    same command skips what is there (resume after a crash or Ctrl-C). `bench report DIR` re-prints.
    """
    if ctx.invoked_subcommand is not None:
        return
    from .harness import BenchOptions, interrupted_exit, run_bench
    from .judge import DEFAULT_JUDGE_PROMPT

    created = out is not None and not out.exists()
    try:
        if dataset is None:
            raise UserError("--dataset is required (gsm8k, gsm8k-dev, math-500, org/name or a .jsonl file)")
        if out is None:
            raise UserError("--out DIR is required")
        if not endpoint:
            check_dtype(dtype)
            check_device(device)
        opts = BenchOptions(
            dataset=dataset,
            out=out,
            model=model,
            endpoint=endpoint,
            split=split,
            data_root=data_root,
            task=task,
            limit=limit,
            methods=methods.split(","),  # 'all' is expanded by the harness (the methods --mode runs)
            n=n,
            max_new_tokens=max_new_tokens,
            mode=mode,
            parallel=parallel,
            thresholds=parse_list(threshold, float, "--threshold"),
            prune_ats=parse_list(prune_at, int, "--prune-at"),
            keeps=parse_list(keep, int, "--keep"),
            budgets=parse_list(budgets, int, "--budgets") or [],
            temperature=temperature,
            top_p=top_p,
            anneal=anneal,
            seed=seed,
            device=device,
            dtype=dtype,
            reward_model=reward_model,
            judge_model=judge_model,
            judge_prompt=judge_prompt or DEFAULT_JUDGE_PROMPT,
        )
        run_bench(opts, err)
    except (UserError, ProgramError) as exc:
        if created and out is not None:
            _remove_if_empty(out)
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        interrupted_exit(err, out or Path("."))


def _remove_if_empty(out: Path) -> None:
    """Remove a folder this bench created when the failure left no result in it (only its run log)."""
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    written = ("results.jsonl", "pools.jsonl")
    if all(p.is_file() and p.name in ("runs.jsonl", *written) for p in entries) and not any(
        p.stat().st_size for p in entries if p.name in written
    ):
        shutil.rmtree(out, ignore_errors=True)


@app.command("report")
def report(
    out_dir: Annotated[Path, typer.Argument(help="A folder written by sgl-adaptive bench.")],
) -> None:
    """Re-print the tables and redraw the plots from DIR/results.jsonl."""
    from .report import write_report

    try:
        write_report(out_dir)
    except UserError as exc:
        raise _fail(str(exc)) from None


@app.command("figures")
def figures(
    samples: Annotated[
        Path | None,
        typer.Option(help="samples.jsonl(.gz) of `finetune data`: the prompts, their samples and rewards."),
    ] = None,
    scores: Annotated[
        list[Path] | None,
        typer.Option(
            help="Out-of-fold scores of those samples (NAME.scores.jsonl(.gz), as `finetune top --cv` "
            "writes them); repeat to compare settings. NAME labels the curves."
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="Legend name of each --scores file, in the same order (default: its NAME)."),
    ] = None,
    selection: Annotated[
        list[str] | None,
        typer.Option(help="Draw only these settings (label or NAME) in the selection figure; repeatable."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the PNG, SVG and figures.json.")] = None,
    bins: Annotated[int, typer.Option(min=2, help="Equal-count bins of the reliability diagram.")] = 10,
) -> None:
    """Draw accuracy against samples (Best-of-n by the score, score-weighted vote, majority, first sample,
    oracle) and the score's reliability diagram from out-of-fold scores, without a model."""
    from .figures import summary_lines, write_figures

    try:
        if samples is None or not scores or out is None:
            raise UserError("--samples, --scores and --out are required")
        data = write_figures(samples, scores, out, labels=label or (), selection=selection or (), bins=bins)
    except UserError as exc:
        raise _fail(str(exc)) from None
    console = Console()
    for line in summary_lines(data):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"wrote {', '.join(data['files'])} in {out}", highlight=False, soft_wrap=True)


@app.command("rescore")
def rescore(
    pools: Annotated[
        Path | None, typer.Option(help="DIR/pools.jsonl of a sweep (sgl-adaptive bench --mode sweep).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="The self-evaluator that re-scores: HF model dir, hub name or LoRA adapter dir."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the re-scored pools.jsonl, rescore.json and the replayed sweep."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer the pools were generated with, to cut the prefixes at the budgets "
            "(default: the sweep's --model folder, else MODEL's)."
        ),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="The pools' dataset (default: the one DIR/runs.jsonl records).")
    ] = None,
    data_root: Annotated[
        str | None, typer.Option(help="Folder holding gsm8k-train.jsonl (default: the recorded one).")
    ] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
) -> None:
    """Re-score every self-evaluation of a sweep's pools with MODEL (one packed forward per question,
    offline), keep everything else, and replay the recorded sweeps from them into DIR2 (the report, as
    `bench report DIR2`). Rerunning the same command resumes."""
    from .rescore import RescoreOptions, run_rescore

    try:
        if pools is None or model is None or out is None:
            raise UserError("--pools, --model and --out are required")
        check_dtype(dtype)
        opts = RescoreOptions(pools, model, out, tokenizer, dataset, data_root, device, dtype)
        run_rescore(opts, err)
    except (UserError, ProgramError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted: rerun the same command to resume", 130) from None
