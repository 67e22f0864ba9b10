"""``sgl-adaptive finetune data|train|cache|probe|top|merge|card|eval``."""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sgl_adaptive.cli_options import DtypeOption
from sgl_adaptive.errors import ProgramError, UserError
from sgl_adaptive.progress import ProgressDisplay, status

app = typer.Typer(
    help="Build self-evaluation data, train the self-evaluator, evaluate it.", no_args_is_help=True
)
err = Console(stderr=True)

DEFAULT_TRUNCATE = "16,32,64,128,256"


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _errors():
    """UserError / ProgramError -> one ``error:`` line and exit code 2."""
    try:
        yield
    except (UserError, ProgramError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None


def _progress(description: str, unit: str) -> tuple[ProgressDisplay, Any]:
    """Progress on stderr (rich bars on a terminal, plain periodic lines in a log); returns (display,
    factory(total, description, unit) -> advance callback)."""
    display = ProgressDisplay(err)

    def factory(total: int, what: str = description, units: str = unit) -> Any:
        return display.task(what, total, unit=units)

    return display, factory


def _torch_dtype(name: str, device: str | None) -> Any:
    """``--dtype`` as a torch dtype: ``auto`` is the device's default (bf16 where the CPU has it)."""
    from sgl_adaptive.backends.precision import default_dtype, parse_dtype
    from sgl_adaptive.finetune.scoring import default_device

    try:
        return parse_dtype(name) or default_dtype(device or default_device())
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


@app.command("data")
def data_command(
    prompts: Annotated[str, typer.Option(help="Prompts: a JSONL file or a Hugging Face dataset name.")],
    out: Annotated[Path, typer.Option(help="Output directory (resumed if it exists).")],
    model: Annotated[
        str | None, typer.Option(help="Policy for the in-process backend (default: embedded 0.5B).")
    ] = None,
    endpoint: Annotated[str | None, typer.Option(help="URL of an SGLang server serving the policy.")] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Policy tokenizer path (default: the model's).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use the first N prompts.")] = None,
    samples_per_prompt: Annotated[
        int, typer.Option("--samples-per-prompt", "-k", help="On-policy samples per prompt (K ≥ 2).")
    ] = 8,
    reward: Annotated[
        str, typer.Option(help="verifier (GSM8K/MATH) or rm:PATH (a sequence-classification reward model).")
    ] = "verifier",
    tie_margin: Annotated[
        float | None, typer.Option(help="ε: j beats i when r_j − r_i > ε (default 0.5 verifier, 0.1·std RM).")
    ] = None,
    truncate: Annotated[
        str, typer.Option(help="Token budgets of mid-generation examples ('' for none).")
    ] = DEFAULT_TRUNCATE,
    heldout_fraction: Annotated[
        float, typer.Option(help="Fraction of prompts held out (by a hash of the prompt id).")
    ] = 0.1,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit per sample.")] = 512,
    seed: Annotated[int, typer.Option(help="Base seed (each prompt gets its own, derived from it).")] = 0,
    split: Annotated[str, typer.Option(help="HF dataset split.")] = "train",
    dataset_config: Annotated[str | None, typer.Option(help="HF dataset configuration.")] = None,
    part: Annotated[
        str,
        typer.Option(help="GSM8K-style records: train (default) or dev part of the bench's split, or all."),
    ] = "train",
    prompt_field: Annotated[
        str | None, typer.Option(help="Record field holding the prompt (default: auto).")
    ] = None,
    shuffle: Annotated[bool, typer.Option(help="Shuffle prompts (by --seed) before --limit.")] = False,
    workers: Annotated[
        int, typer.Option(help="Prompts in flight at once (batched together on the in-process backend).")
    ] = 1,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (in-process backend and reward model).")
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow custom code of the reward model (ArmoRM).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Sample K on-policy responses per prompt, reward them, label them pairwise, write train/held-out JSONL."""
    from sgl_adaptive.finetune.build_data import SamplingSettings, build_data
    from sgl_adaptive.finetune.examples import parse_budgets
    from sgl_adaptive.finetune.prompts import load_prompts
    from sgl_adaptive.finetune.rewards import reward_from_spec
    from sgl_adaptive.runner import load_backend

    with _errors():
        if model and endpoint:
            raise UserError("give either --model or --endpoint, not both")
        if part not in ("train", "dev", "all"):
            raise UserError(f"--part must be train, dev or all (got {part!r})")
        if not 0.0 <= heldout_fraction < 1.0:
            raise UserError(f"--heldout-fraction must be within [0, 1) (got {heldout_fraction})")
        if workers < 1:
            raise UserError(f"--workers must be at least 1 (got {workers})")
        try:
            budgets = parse_budgets(truncate)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        settings = SamplingSettings(samples_per_prompt, temperature, top_p, max_new_tokens, seed)
        items = load_prompts(
            prompts,
            split=split,
            config=dataset_config,
            part=part,
            prompt_field=prompt_field,  # type: ignore[arg-type]
            limit=limit,
            shuffle_seed=seed if shuffle else None,
        )
        reward_fn = reward_from_spec(reward, device=device, trust_remote_code=trust_remote_code)
        endpoint_backend = load_backend(None, endpoint) if endpoint else None
        if endpoint_backend is not None:
            model_id = endpoint_backend.model_info.get("model_path") or endpoint
            tokenizer_path = tokenizer or model_id
        else:
            from sgl_adaptive.model_store import resolve_model

            model_id = resolve_model(model, console=err, base=True)
            tokenizer_path = tokenizer or model_id

        def backend_factory() -> Any:
            if endpoint_backend is not None:
                return endpoint_backend
            progress.print(f"loading {model_id} …")  # no spinner inside the live bar
            return load_backend(model_id, None, seed=seed, device=device)  # (a spinner would nest)

        def tokenizer_factory(backend: Any) -> tuple[Any, str]:
            if backend is not None and getattr(backend, "tokenizer", None) is not None and not tokenizer:
                return backend.tokenizer, tokenizer_path
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(tokenizer_path), tokenizer_path
            except (OSError, ValueError) as exc:
                raise UserError(
                    f"cannot load the policy tokenizer {tokenizer_path!r} (use --tokenizer): {exc}"
                ) from None

        source = {
            "prompts": prompts,
            "split": split,
            "config": dataset_config,
            "part": part,
            "prompt_field": prompt_field,
        }
        progress, factory = _progress("sampling prompts", "prompts")
        with progress:
            manifest = build_data(
                items,
                out,
                backend_factory=backend_factory,
                tokenizer_factory=tokenizer_factory,
                model_id=model_id,
                reward=reward_fn,
                settings=settings,
                source=source,
                budgets=budgets,
                tie_margin=tie_margin,
                heldout_fraction=heldout_fraction,
                workers=workers,
                progress=factory,
            )
    counts = manifest["counts"]
    if as_json:
        sys.stdout.write(json.dumps(_json_safe(manifest), ensure_ascii=False) + "\n")
        return
    err.print(
        f"{counts['prompts']} prompts ({counts['heldout_prompts']} held out), {counts['samples']} samples, "
        f"mean reward {counts['mean_reward']:.3f}, tie margin {counts['tie_margin']:.3g}; examples: "
        f"train {counts['examples']['train']} ({counts['keep_fraction']['train']:.0%} No), "
        f"held-out {counts['examples']['heldout']} ({counts['keep_fraction']['heldout']:.0%} No) -> {out}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("train")
def train_command(
    data: Annotated[Path, typer.Option(help="Directory written by `finetune data`.")],
    out: Annotated[Path, typer.Option(help="Output checkpoint directory.")],
    model: Annotated[str | None, typer.Option(help="Policy to fine-tune (default: embedded 0.5B).")] = None,
    lora: Annotated[bool, typer.Option(help="Train a LoRA adapter (merged on export).")] = False,
    epochs: Annotated[float, typer.Option(help="Epochs over train.jsonl.")] = 1.0,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 1e-4 LoRA, 1e-5 full).")] = None,
    max_steps: Annotated[int, typer.Option(help="Stop after N optimizer steps (-1: epochs decide).")] = -1,
    batch_size: Annotated[int, typer.Option(help="Examples per device per step.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    max_length: Annotated[int, typer.Option(help="Drop examples longer than this (tokens).")] = 2048,
    soft_labels: Annotated[
        bool,
        typer.Option(
            "--soft-labels/--hard-labels",
            help="Target: the pairwise P(win or tie) against another sample (the paper's, default) "
            "or the hard label 'no other sample beats it'.",
        ),
    ] = True,
    max_examples: Annotated[
        int | None, typer.Option(help="Train on a seeded random subset of N examples (short CPU runs).")
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option(help="Train only on these budgets, e.g. full,64,128 (default: all in the data)."),
    ] = None,
    kl_weight: Annotated[
        float, typer.Option(help="KL guard to the frozen base on response tokens (0: off).")
    ] = 0.0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    lora_layers: Annotated[
        int | None, typer.Option(help="With --lora: adapt only the last N layers (default all).")
    ] = None,
    mixed_precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast on bf16 GPUs and bf16-capable CPUs) or no (fp32).")
    ] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Trade compute for memory.")] = False,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    logging_steps: Annotated[int, typer.Option(help="Log the training loss every N steps.")] = 10,
    export_dtype: Annotated[
        str, typer.Option(help="auto (the base's dtype), float32, bfloat16 or float16.")
    ] = "auto",
    save_adapter: Annotated[bool, typer.Option(help="With --lora: also write OUT/adapter.")] = True,
    adapter_only: Annotated[bool, typer.Option(help="With --lora: write only the adapter.")] = False,
    heldout_limit: Annotated[
        int | None, typer.Option(help="Held-out examples scored before/after (default all; 0: none).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu to force the CPU.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the training report as JSON.")] = False,
) -> None:
    """One-token SFT of the policy on its self-evaluation labels; exports an HF checkpoint."""
    from sgl_adaptive.finetune.train import TrainSettings, parse_train_budgets, train
    from sgl_adaptive.model_store import resolve_model

    with _errors():
        if max_examples is not None and max_examples < 1:
            raise UserError(f"--max-examples must be at least 1 (got {max_examples})")
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lr must be a positive number (got {lr})")
        if adapter_only and not lora:
            raise UserError("--adapter-only needs --lora")
        if lora_layers is not None and not lora:
            raise UserError("--lora-layers needs --lora")
        settings = TrainSettings(
            lora=lora,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            epochs=epochs,
            lr=lr,
            max_steps=max_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_length=max_length,
            soft_labels=soft_labels,
            max_examples=max_examples,
            budgets=parse_train_budgets(budgets),
            kl_weight=kl_weight,
            lora_layers=lora_layers,
            mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing,
            seed=seed,
            logging_steps=logging_steps,
            export_dtype=export_dtype,
            save_adapter=save_adapter,
            adapter_only=adapter_only,
        )
        model_path = resolve_model(model, console=err, base=True)
        report = train(
            model_path,
            data,
            out,
            settings,
            device=device,
            heldout_limit=heldout_limit,
            log=lambda m: err.print(m, highlight=False, soft_wrap=True),
        )
    if "exported" not in report:  # another process of a multi-process run: the main one reports
        return
    if as_json:
        sys.stdout.write(json.dumps(_json_safe(report), ensure_ascii=False) + "\n")
    else:
        err.print(f"{report['steps']} steps, train loss {report['train_loss']:.4f} -> {out}", highlight=False)


@app.command("cache")
def cache_command(
    data: Annotated[Path, typer.Option(help="Directory written by `finetune data` (train and held-out).")],
    out: Annotated[Path, typer.Option(help="Cache directory (resumed if it exists).")],
    k: Annotated[
        int, typer.Option(help="Top blocks to train later: the state entering block L-k is cached.")
    ] = 4,
    model: Annotated[str | None, typer.Option(help="Base model (default: embedded 0.5B).")] = None,
    limit: Annotated[int | None, typer.Option(help="Cache the first N prompts only.")] = None,
    derive: Annotated[
        int | None,
        typer.Option(
            help="Instead: store the state entering block L-K of every cached prompt (K < the cache's k)."
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option(help="With --derive: keep up with a `finetune cache` still running.")
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    dtype: DtypeOption = "auto",
) -> None:
    """Run the frozen lower layers once over each prompt's packed tree and store their output (resumable)."""
    from sgl_adaptive.devices import check_device
    from sgl_adaptive.finetune.activation_cache import build_cache
    from sgl_adaptive.model_store import resolve_model

    with _errors():
        if limit is not None and limit < 1:
            raise UserError(f"--limit must be at least 1 (got {limit})")
        check_device(device)
        torch_dtype = _torch_dtype(dtype, device)
        model_path = resolve_model(model, console=err, base=True)
        if derive is not None:
            from sgl_adaptive.finetune.activation_cache import ActivationCache, derive_states
            from sgl_adaptive.finetune.top_train import check_cache_model, load_base

            activations = ActivationCache(out)
            check_cache_model(activations, model_path)
            base, _ = load_base(model_path, dtype=torch_dtype, device=device)
            progress, factory = _progress(f"deriving the state entering block L-{derive}", "prompts")
            with progress:
                done = derive_states(
                    base, activations, derive, follow=follow, progress=factory, log=progress.print
                )
            err.print(f"derived {done} prompts -> {out}", highlight=False)
            return
        progress, factory = _progress("caching prompts", "prompts")
        with progress:
            manifest = build_cache(
                model_path,
                data,
                out,
                k=k,
                dtype=torch_dtype,
                device=device,
                limit=limit,
                progress=factory,
                log=progress.print,
            )
    err.print(
        f"{manifest['prompts']} prompts, {manifest['examples']} examples, state entering block "
        f"{manifest['layers'] - manifest['k']} of {manifest['layers']} -> {out}",
        highlight=False,
    )


@app.command("probe")
def probe_command(
    cache: Annotated[Path, typer.Option(help="Activation cache (`finetune cache`).")],
    out: Annotated[Path, typer.Option(help="Folder for the curve and each layer's out-of-fold scores.")],
    layers: Annotated[
        str | None, typer.Option(help="Layers to probe, e.g. 8,12,16,20 (default: all cached).")
    ] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds, grouped by prompt.")] = 5,
    soft_labels: Annotated[
        bool,
        typer.Option("--soft-labels/--hard-labels", help="Probe target: P(win or tie) or the hard label."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Fold seed.")] = 0,
    budgets: Annotated[
        str | None,
        typer.Option(help="Probe these examples only, e.g. full (complete responses) or full,128."),
    ] = None,
) -> None:
    """Out-of-fold linear probes on each cached layer's state at the answer positions (the probe curve)."""
    from sgl_adaptive.finetune.activation_cache import ActivationCache
    from sgl_adaptive.finetune.experiments import probe_curve
    from sgl_adaptive.finetune.train import parse_train_budgets

    with _errors():
        if folds < 2:
            raise UserError(f"--folds must be at least 2 (got {folds})")
        try:
            wanted = [int(x) for x in layers.split(",")] if layers else None
        except ValueError:
            raise UserError(f"--layers takes layer numbers, e.g. 8,12,16 (got {layers!r})") from None
        probe_curve(
            ActivationCache(cache),
            out,
            layers=wanted,
            folds=folds,
            seed=seed,
            soft=soft_labels,
            budgets=parse_train_budgets(budgets),
            log=lambda m: err.print(m, highlight=False, soft_wrap=True),
        )


@app.command("top")
def top_command(
    cache: Annotated[Path, typer.Option(help="Activation cache (`finetune cache`).")],
    out: Annotated[Path, typer.Option(help="Folder for the reports (--cv) or the adapter (--export).")],
    name: Annotated[str, typer.Option(help="Name of this run's report files.")] = "top",
    model: Annotated[
        str | None, typer.Option(help="The cache's base model (default: embedded 0.5B).")
    ] = None,
    k: Annotated[int, typer.Option(help="Top blocks to train (at most the cache's k).")] = 1,
    cv: Annotated[
        int, typer.Option(help="Cross-validate with N folds grouped by prompt (0: train on all and export).")
    ] = 5,
    train_prompts: Annotated[
        int | None,
        typer.Option(help="With --cv: train each fold on N of its training prompts (learning curve)."),
    ] = None,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    head_rows: Annotated[bool, typer.Option(help="Also train the head's Yes/No rows.")] = True,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW, cosine schedule).")] = 5e-4,
    epochs: Annotated[float, typer.Option(help="Epochs over the training prompts.")] = 2.0,
    prompts_per_step: Annotated[int, typer.Option(help="Prompts (packed trees) per optimizer step.")] = 4,
    soft_labels: Annotated[
        bool,
        typer.Option(
            "--soft-labels/--hard-labels", help="Target: P(win or tie) (the paper's) or the hard label."
        ),
    ] = True,
    kl_weight: Annotated[
        float, typer.Option(help="Weight of KL(base || model) on response positions.")
    ] = 0.1,
    drift_positions: Annotated[
        int, typer.Option(help="Response positions per full response for the KL term.")
    ] = 4,
    budgets: Annotated[
        str | None, typer.Option(help="Train on these budgets only, e.g. full,64,128.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Training and fold seed.")] = 0,
    dtype: DtypeOption = "auto",
) -> None:
    """Train the top k blocks (LoRA) and the head's Yes/No rows from the cache: out of fold (--cv N), or on
    every cached prompt with the adapter exported (--cv 0)."""
    from sgl_adaptive.finetune.activation_cache import ActivationCache
    from sgl_adaptive.finetune.top_train import TopSettings
    from sgl_adaptive.finetune.train import parse_train_budgets
    from sgl_adaptive.model_store import resolve_model

    log = lambda m: err.print(m, highlight=False, soft_wrap=True)  # noqa: E731
    with _errors():
        if cv == 1 or cv < 0:
            raise UserError(f"--cv must be 0 (no cross-validation) or at least 2 (got {cv})")
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lr must be a positive number (got {lr})")
        if epochs <= 0 or prompts_per_step < 1:
            raise UserError("--epochs must be positive and --prompts-per-step at least 1")
        torch_dtype = _torch_dtype(dtype, "cpu")
        settings = TopSettings(
            k=k,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            head_rows=head_rows,
            lr=lr,
            epochs=epochs,
            prompts_per_step=prompts_per_step,
            soft_labels=soft_labels,
            kl_weight=kl_weight,
            drift_positions=drift_positions,
            budgets=parse_train_budgets(budgets),
            seed=seed,
        )
        activations = ActivationCache(cache)
        model_path = resolve_model(model, console=err, base=True)
        if cv:
            from sgl_adaptive.finetune.experiments import top_cv

            top_cv(
                model_path,
                activations,
                settings,
                out,
                name,
                folds=cv,
                seed=seed,
                train_prompts=train_prompts,
                dtype=torch_dtype,
                log=log,
            )
            return
        from sgl_adaptive.finetune.top_train import (
            TopStack,
            check_cache_model,
            export_adapter,
            load_base,
            train_stack,
        )

        check_cache_model(activations, model_path)
        base, encoder = load_base(model_path, dtype=torch_dtype)
        stack = TopStack(base, activations, settings, encoder)
        prompts = activations.complete()
        run = train_stack(stack, prompts, log=log)
        card = {
            "base_model": model_path,
            "base_sha256": activations.manifest["model_sha256"],
            "data_sha256": activations.manifest["data_sha256"],
            "prompts": len(prompts),
            "run": run,
        }
        export_adapter(stack, out, card)
        log(f"{run['steps']} steps on {len(prompts)} prompts in {run['train_s']:.0f} s -> {out}")


@app.command("merge")
def merge_command(
    adapter: Annotated[Path, typer.Option(help="Adapter folder (`finetune top --cv 0`).")],
    model: Annotated[str | None, typer.Option(help="Base model (default: embedded 0.5B).")] = None,
) -> None:
    """Merge an adapter into its base once (cached beside the models) and print the merged folder, which an
    unmodified SGLang server loads."""
    from sgl_adaptive.model_store import cached_merge, resolve_model

    with _errors():
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{adapter} is not an adapter folder (no adapter_config.json)")
        print(cached_merge(Path(resolve_model(model, console=err, base=True)), adapter, console=err))


@app.command("card")
def card_command(
    adapter: Annotated[Path, typer.Option(help="Adapter folder (`finetune top --cv 0`).")],
    report: Annotated[
        Path,
        typer.Option(help="The cross-validation report of its setting (`finetune top --cv N`, NAME.json)."),
    ],
    greedy_base: Annotated[
        Path | None,
        typer.Option(
            help="`bench --dataset gsm8k-dev --methods greedy` run of the base (drift, greedy before)."
        ),
    ] = None,
    greedy_trained: Annotated[
        Path | None, typer.Option(help="The same run with the merged model (greedy after).")
    ] = None,
    greedy_control: Annotated[
        Path | None, typer.Option(help="A second run of the base (how far greedy agrees with itself).")
    ] = None,
    times: Annotated[Path | None, typer.Option(help="times.tsv of scripts/selfeval_cpu.sh.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: embedded 0.5B).")] = None,
    command: Annotated[
        list[str] | None, typer.Option(help="A command that made it, for the card (repeatable).")
    ] = None,
    dtype: DtypeOption = "auto",
) -> None:
    """Write the adapter's model card (README.md, card.json) and say whether it becomes the default model."""
    from sgl_adaptive.finetune.experiments import write_card
    from sgl_adaptive.model_store import cached_merge, resolve_model

    with _errors():
        for path in (adapter / "training.json", report):
            if not path.is_file():
                raise UserError(f"{path} not found")
        base = Path(resolve_model(model, console=err, base=True))
        default, why = write_card(
            adapter,
            report,
            merged=str(cached_merge(base, adapter, console=err)),
            base_path=str(base),
            greedy_base=greedy_base,
            greedy_trained=greedy_trained,
            greedy_control=greedy_control,
            times=times,
            commands=command or [],
            dtype=_torch_dtype(dtype, "cpu"),
            log=lambda m: err.print(m, highlight=False, soft_wrap=True),
        )
        err.print(
            f"{adapter}/README.md: default model: {'yes' if default else 'no'} ({why})", highlight=False
        )


@app.command("eval")
def eval_command(
    data: Annotated[Path, typer.Option(help="Directory written by `finetune data`.")],
    model: Annotated[str | None, typer.Option(help="Model to evaluate (default: embedded 0.5B).")] = None,
    base: Annotated[
        str | None,
        typer.Option(
            help="Untrained model for the side-by-side and drift ('none' to skip; default: the checkpoint's base)."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="heldout or train.")] = "heldout",
    limit: Annotated[int | None, typer.Option(help="Use the first N examples.")] = None,
    drift_samples: Annotated[
        int, typer.Option(help="Held-out responses for the drift measure (0: skip).")
    ] = 64,
    batch_tokens: Annotated[
        int,
        typer.Option(
            help="Ignored (kept for old scripts): scoring now runs one packed forward per prompt, "
            "whatever its size."
        ),
    ] = 8192,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    dtype: DtypeOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", help="Also write the JSON report here.")] = None,
) -> None:
    """AUROC (95% bootstrap interval over prompts, and within prompts), Brier (per budget), Best-of-K
    selection against first sample, majority vote and oracle, and drift, before vs after training."""
    with _errors():
        report = _evaluate(data, model, base, split, limit, drift_samples, device, dtype)
    payload = json.dumps(_json_safe(report), ensure_ascii=False)
    if out_file:
        out_file.write_text(payload + "\n")
    if as_json:
        sys.stdout.write(payload + "\n")
        return
    from rich.table import Table

    from sgl_adaptive.finetune.evaluate import format_table

    names = [Path(p).name for p in (report.get("base_model"), report["model_path"]) if p]
    table = Table(
        title=f"self-evaluation on {report['data']['examples']} {split} examples: {' vs '.join(names)}"
    )
    table.add_column("metric")
    table.add_column("base")
    table.add_column("model")
    for row in format_table(report):
        table.add_row(*row)
    Console().print(table)


def _evaluate(
    data: Path,
    model: str | None,
    base: str | None,
    split: str,
    limit: int | None,
    drift_samples: int,
    device: str | None,
    dtype_name: str,
) -> dict[str, Any]:
    """The ``eval`` report; each model scores every prompt's examples in one packed forward."""
    from sgl_adaptive.data import read_jsonl
    from sgl_adaptive.devices import check_device
    from sgl_adaptive.finetune.evaluate import drift, drift_items, evaluate_scores
    from sgl_adaptive.finetune.packing import score_packed
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm
    from sgl_adaptive.finetune.train import CHECKPOINT_INFO
    from sgl_adaptive.model_store import resolve_model

    check_device(device)
    dtype = _torch_dtype(dtype_name, device)
    if split not in ("heldout", "train"):
        raise UserError(f"--split must be heldout or train (got {split!r})")
    examples = (
        list(read_jsonl(data / f"{split}.jsonl"))[:limit]
        if limit
        else list(read_jsonl(data / f"{split}.jsonl"))
    )
    if not examples:
        raise UserError(f"{data / f'{split}.jsonl'} has no examples")
    model_path = (
        model
        if model and (Path(model) / "adapter_config.json").is_file()
        else resolve_model(model, console=err)
    )
    if base is None:
        info_path = Path(model_path) / CHECKPOINT_INFO
        base = json.loads(info_path.read_text()).get("base_model") if info_path.is_file() else None
    base = None if base in (None, "none", "") else resolve_model(base, console=err)

    report: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "model_path": model_path,
        "base_model": base,
        "data": {"dir": str(data), "split": split, "examples": len(examples)},
    }
    progress, factory = _progress("scoring the model", "examples")
    with progress:
        with status(err, "loading the model …"):
            tuned, tokenizer = load_causal_lm(model_path, device=device, dtype=dtype)
        encoder = SelfEvalEncoder(tokenizer)
        scores = score_packed(tuned, encoder, examples, on_prompt=factory(len(examples)))
        report["model"] = evaluate_scores(examples, scores)
        if base:
            with status(err, "loading the base model …"):
                base_model, base_tok = load_causal_lm(base, device=device, dtype=dtype)
            base_encoder = SelfEvalEncoder(base_tok)
            base_scores = score_packed(
                base_model, base_encoder, examples, on_prompt=factory(len(examples), "scoring the base")
            )
            report["base"] = evaluate_scores(examples, base_scores)
            if drift_samples > 0:
                report["drift"] = drift(
                    base_model,
                    tuned,
                    encoder,
                    examples,
                    limit=drift_samples,
                    on_item=factory(len(drift_items(examples, drift_samples)), "drift", "responses"),
                )
    headline = ("auroc", "brier", "auroc_ci", "within_prompt_auroc", "within_prompt_prompts")
    report.update({"prompts": report["model"]["prompts"], "best_of_n": report["model"]["best_of_n"]})
    report.update({key: report["model"][key] for key in headline})
    if base:
        report.update({f"{key}_before": report["base"][key] for key in headline})
    return report
