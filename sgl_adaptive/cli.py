"""The ``sgl-adaptive`` command line (typer)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from sgl_adaptive.cli_options import (
    ConfidenceWindowOption,
    DeviceOption,
    DtypeOption,
    EndpointOption,
    JudgePromptOption,
    MaxNewTokensOption,
    ModelOption,
    RewardModelOption,
    ScorerOption,
    SeedOption,
    SelectorOption,
    StopSequenceOption,
    TopPOption,
    VoteTemperatureOption,
    method_config,
)
from sgl_adaptive.config import KNOBS, METHODS, MethodConfig, check_options_used
from sgl_adaptive.devices import check_device
from sgl_adaptive.errors import ProgramError, UserError
from sgl_adaptive.rules import STOP_RULES
from sgl_adaptive.runner import check_dtype, load_backend, read_prompt, run
from sgl_adaptive.scorers import DEFAULT_JUDGE_PROMPT

app = typer.Typer(
    name="sgl-adaptive",
    help="Adaptive Best-of-N sampling with capability-aware self-evaluation, on SGLang.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _add_subcommands() -> None:
    from sgl_adaptive.bench.cli import app as bench_app
    from sgl_adaptive.finetune.cli import app as finetune_app

    app.add_typer(finetune_app, name="finetune")
    app.add_typer(bench_app, name="bench")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error to stderr and return the exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        from sgl_adaptive import __version__

        typer.echo(f"sgl-adaptive {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Adaptive Best-of-N sampling with capability-aware self-evaluation, on SGLang."""


@app.command("run")
def run_command(
    ctx: typer.Context,
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="The user prompt; - reads it from standard input.", metavar="PROMPT", show_default=False
        ),
    ] = None,
    prompt_file: Annotated[
        str | None, typer.Option(help="Read the prompt from this UTF-8 file instead (- : standard input).")
    ] = None,
    model: ModelOption = None,
    endpoint: EndpointOption = None,
    method: Annotated[str, typer.Option(help=f"One of: {', '.join(METHODS)}.")] = "adaptive",
    n: Annotated[int, typer.Option(help="Sample budget.")] = 16,
    threshold: Annotated[
        float, typer.Option(help="Adaptive sampling stops once the best score reaches it.")
    ] = 0.98,
    prune_at: Annotated[
        int, typer.Option(help="Tokens before partial responses are scored (pruning).")
    ] = 128,
    keep: Annotated[int, typer.Option(help="Samples continued after the pruning point (at most --n).")] = 4,
    max_new_tokens: MaxNewTokensOption = 512,
    stop_sequences: StopSequenceOption = None,
    temperature: Annotated[
        float,
        typer.Option(help="Sampling temperature (annealed by adaptive methods; 0: one greedy sample)."),
    ] = 0.7,
    top_p: TopPOption = 1.0,
    anneal: Annotated[str, typer.Option(help="Temperature annealing: paper or none.")] = "paper",
    scorer: ScorerOption = "self-eval",
    confidence_window: ConfidenceWindowOption = 64,
    judge_prompt: JudgePromptOption = DEFAULT_JUDGE_PROMPT,
    reward_model: RewardModelOption = None,
    selector: SelectorOption = "argmax",
    vote_temperature: VoteTemperatureOption = 0.1,
    stop: Annotated[
        str, typer.Option(help=f"When adaptive sampling stops: {', '.join(STOP_RULES)}.", metavar="NAME")
    ] = "threshold",
    stop_confidence: Annotated[
        float, typer.Option(help="beta: stop once P(leading answer stays ahead) exceeds it.")
    ] = 0.95,
    stop_window: Annotated[int, typer.Option(help="esc: stop once this many last answers agree.")] = 4,
    stop_warmup: Annotated[
        int, typer.Option(help="deepconf: samples whose scores set the threshold (the warm-up).")
    ] = 4,
    stop_percentile: Annotated[
        float, typer.Option(help="deepconf: the threshold is this percentile (0-100) of the warm-up scores.")
    ] = 90.0,
    seed: SeedOption = 0,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Answer PROMPT with a method; print the answer and a one-line cost summary.

    Progress (rounds, samples, scores) goes to stderr. An option the method does not read (e.g. --keep
    with best-of-n) is an error."""
    try:
        text = _prompt_text(prompt, prompt_file)
        config = method_config(ctx)
        config.check_for(method)
        check_options_used(method, _given(ctx, KNOBS), config)
        backend = backend_loader(model, endpoint, seed, device, dtype, config)()
        with err.status(f"running {method} …"):
            result = run(text, backend, method, config, progress=_progress)
    except (UserError, ProgramError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        typer.echo(result.answer)
        err.print(result.summary(), highlight=False, soft_wrap=True)


def _prompt_text(prompt: str | None, prompt_file: str | None) -> str:
    """PROMPT, or the text of --prompt-file or of standard input (PROMPT ``-``)."""
    if prompt is not None and prompt_file is not None:
        raise UserError("give the prompt either as PROMPT or with --prompt-file, not both")
    if prompt_file is not None:
        return read_prompt(prompt_file)
    if prompt is None:
        raise UserError("no prompt: give PROMPT, - (read from standard input) or --prompt-file PATH")
    if prompt == "-":
        return read_prompt("-")
    if not prompt.strip():
        raise UserError("the prompt is empty")
    return prompt


def _given(ctx: typer.Context, names: frozenset[str]) -> set[str]:
    """The options among ``names`` given on the command line (not left at their defaults)."""
    given = ("COMMANDLINE", "ENVIRONMENT")  # by name: typer may carry its own copy of click's enum
    return {name for name in names if getattr(ctx.get_parameter_source(name), "name", None) in given}


def backend_loader(
    model: str | None,
    endpoint: str | None,
    seed: int,
    device: str | None,
    dtype: str,
    config: MethodConfig | None = None,
) -> Callable[[], Any]:
    """Check the backend options (and ``config``'s reward-model path) now, before torch is imported; return
    what loads the backend, and the ``rm`` scorer's reward model into ``reward_model.shared`` where the
    programs find it (on ``device``; default: cuda when available)."""
    if model and endpoint:
        raise UserError("give either --model or --endpoint, not both")
    if not endpoint:
        check_dtype(dtype)
        check_device(device)
    reward_model = config.reward_model if config is not None else None
    if reward_model:
        from sgl_adaptive.reward_model import check_path

        check_path(reward_model)

    def load() -> Any:
        backend = load_backend(model, endpoint, seed=seed, device=device, dtype=dtype, console=err)
        if reward_model:
            from sgl_adaptive.reward_model import shared

            with err.status(f"loading the reward model {reward_model} …"):
                shared(reward_model, device)
        return backend

    return load


def _progress(line: str) -> None:
    err.print(line, style="dim", highlight=False, markup=False, soft_wrap=True)


@app.command("batch")
def batch_command(
    ctx: typer.Context,
    prompts_file: Annotated[
        str,
        typer.Argument(
            help='JSON Lines, one {"id": ..., "prompt": ...} (or "question", or "messages": a chat) per '
            'line; a "reference" or GSM8K "answer" field is graded.',
            metavar="PROMPTS.jsonl",
            show_default=False,
        ),
    ],
    budget: Annotated[int, typer.Option(help="Total samples (or tokens) for all the prompts.")],
    out: Annotated[
        str, typer.Option(help="Output JSON Lines, one line per prompt (a rerun skips ids already there).")
    ],
    budget_unit: Annotated[str, typer.Option(help="What --budget counts: samples or tokens.")] = "samples",
    allocation: Annotated[
        str,
        typer.Option(
            help="Who gets the next samples: score (lowest best score), agreement, even (baseline)."
        ),
    ] = "score",
    method: Annotated[
        str, typer.Option(help="best-of-n, or adaptive (annealed; a prompt closes once --stop holds).")
    ] = "best-of-n",
    model: ModelOption = None,
    endpoint: EndpointOption = None,
    n: Annotated[int, typer.Option(help="The most samples one prompt may get.")] = 16,
    concurrency: Annotated[int, typer.Option(help="Prompts sampled at once in a round.")] = 8,
    max_new_tokens: MaxNewTokensOption = 512,
    stop_sequences: StopSequenceOption = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    top_p: TopPOption = 1.0,
    anneal: Annotated[str, typer.Option(help="adaptive: temperature annealing, paper or none.")] = "paper",
    scorer: ScorerOption = "self-eval",
    confidence_window: ConfidenceWindowOption = 64,
    judge_prompt: JudgePromptOption = DEFAULT_JUDGE_PROMPT,
    reward_model: RewardModelOption = None,
    selector: SelectorOption = "argmax",
    vote_temperature: VoteTemperatureOption = 0.1,
    stop: Annotated[
        str, typer.Option(help=f"adaptive: when a prompt closes: {', '.join(STOP_RULES)}.", metavar="NAME")
    ] = "threshold",
    threshold: Annotated[float, typer.Option(help="threshold: the best score that closes a prompt.")] = 0.98,
    stop_confidence: Annotated[float, typer.Option(help="beta: P(leading answer stays ahead).")] = 0.95,
    stop_window: Annotated[int, typer.Option(help="esc: this many last answers agree.")] = 4,
    stop_warmup: Annotated[int, typer.Option(help="deepconf: warm-up samples.")] = 4,
    stop_percentile: Annotated[float, typer.Option(help="deepconf: percentile of the warm-up.")] = 90.0,
    compare_even: Annotated[
        bool, typer.Option(help="Also run an even split of the same budget and report both accuracies.")
    ] = False,
    seed: SeedOption = 0,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
) -> None:
    """Spend one sample budget across PROMPTS.jsonl where it helps most; one JSON line per prompt to --out.

    Round 1 gives every prompt a sample (two for agreement); each later round gives the next samples to
    the prompts whose best score is lowest (score) or whose answers agree least (agreement). Progress
    and a summary line (samples, tokens, accuracy when graded) go to stderr."""
    from sgl_adaptive.batch import BatchSettings, run_batch_file

    try:
        config = method_config(ctx)
        settings = BatchSettings(budget, budget_unit, allocation, method, concurrency, config)
        check_options_used(method, _given(ctx, KNOBS), config)
        backend = backend_loader(model, endpoint, seed, device, dtype, config)
        summary, even = run_batch_file(
            prompts_file, out, backend, settings, compare_even=compare_even, progress=_progress
        )
    except (UserError, ProgramError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted (a rerun resumes)", 130) from None
    line = f"batch: {summary.prompts} prompts | {summary.samples} samples | {summary.tokens} tokens"
    if summary.accuracy is not None:
        line += f" | accuracy {summary.accuracy:.1%} of {summary.graded}"
    if even is not None and even.accuracy is not None:
        line += f" | even split: accuracy {even.accuracy:.1%}, {even.samples} samples, {even.tokens} tokens"
    err.print(line, highlight=False, soft_wrap=True)


@app.command("model")
def model_command(
    base: Annotated[bool, typer.Option(help="The base model, without the self-evaluation adapter.")] = False,
) -> None:
    """Print the default model's folder, building it first if needed (for `launch_server --model-path`)."""
    from sgl_adaptive.model_store import resolve_model

    try:
        typer.echo(resolve_model(None, console=err, base=base))
    except UserError as exc:
        raise fail(str(exc)) from None


@app.command("serve")
def serve_command(
    model: Annotated[
        str | None, typer.Option(help="HF model dir, GGUF file or hub name (default: embedded).")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="URL of a running SGLang server or sglang-router to serve in front of.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 30000,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model id clients name (default: the model path).")
    ] = None,
    max_concurrency: Annotated[int, typer.Option(help="Requests whose method runs at once.")] = 4,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a slot; beyond them: HTTP 429.")] = 16,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take, queue included (then HTTP 504).")
    ] = 600.0,
    max_samples: Annotated[int, typer.Option(help="The largest sample budget a request may ask for.")] = 64,
    seed: Annotated[int, typer.Option(help="Sampling seed of the in-process backend.")] = 0,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
) -> None:
    """Serve adaptive Best-of-N behind an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health).

    With the in-process backend (--model, or neither option) the same port also answers SGLang's native
    API (/generate, /get_model_info, ...), so `--endpoint` clients work too. SIGTERM or Ctrl-C drains:
    new requests get 503 while those in flight finish."""
    import signal
    import threading

    from sgl_adaptive.openai_server import ServerOptions, serve_openai

    try:
        options = ServerOptions(max_concurrency, max_queue, request_timeout)
        if max_samples < 1:
            raise UserError(f"--max-samples must be at least 1 (got {max_samples})")
        backend = backend_loader(model, endpoint, seed, device, dtype)()
        native = None
        if not endpoint:
            from sgl_adaptive.backends.http_server import serve

            native = serve(backend, "127.0.0.1", 0)
        native_url = f"http://127.0.0.1:{native.server_address[1]}" if native else None
        server = serve_openai(
            backend,
            host,
            port,
            model=served_model_name,
            options=options,
            max_samples=max_samples,
            native_url=native_url,
        )
    except (UserError, OSError) as exc:
        raise fail(str(exc)) from None
    native_note = "; SGLang's native API (/generate …) on the same port" if native else ""
    err.print(
        f"serving {server.limits.model} on http://{host}:{server.server_address[1]}: OpenAI API at /v1"
        f"{native_note} (Ctrl-C or SIGTERM stops)",
        highlight=False,
        soft_wrap=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    err.print("stopping: finishing the requests in flight …", highlight=False, soft_wrap=True)
    drained = server.stop()
    if native is not None:
        native.shutdown()
    if not drained:
        raise fail("stopped before every request in flight had finished (--request-timeout passed)", 1)


_add_subcommands()

if __name__ == "__main__":
    app()
