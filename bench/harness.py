"""Runs a bench: validate the options, plan (question x method x config) items, skip those already in
``DIR/results.jsonl``, run the rest (live: each method's program; sweep: one scored pool per question,
then every configuration offline), append one line per item, then report.

Files in DIR: ``results.jsonl`` (one line per question x method x config), ``pools.jsonl`` (sweep
pools and their extra scores), ``runs.jsonl`` (one line per invocation), ``summary.md`` and PNGs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.errors import UserError
from sgl_adaptive.scorers import TRAINING_FREE

from .datasets import Dataset, Item, answer_key, grade, load_dataset_items
from .judge import DEFAULT_JUDGE_PROMPT, judge_config
from .methods import (
    METHODS,
    PRUNING,
    LiveContext,
    costs_dict,
    label,
    live_jobs,
    mode_refusal,
    run_live,
    runs_in,
)
from .store import JsonlStore, config_hash
from .sweep import Pool, PoolSample, sample_counts, simulate, sweep_grid

RESULTS, POOLS, RUNS = "results.jsonl", "pools.jsonl", "runs.jsonl"
POOL_BUDGETS = (16, 32, 64, 128, 256)
SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)


@dataclass
class BenchOptions:
    """Everything ``sgl-adaptive bench`` takes (lists already parsed)."""

    dataset: str
    out: Path
    model: str | None = None
    endpoint: str | None = None
    split: str | None = None
    data_root: str | None = None
    task: str | None = None
    limit: int | None = None
    methods: list[str] = field(default_factory=lambda: ["greedy", "best-of-n", "adaptive", "prune"])
    n: int = 16
    max_new_tokens: int = 512
    mode: str = "live"
    parallel: int = 1
    thresholds: list[float] | None = None
    prune_ats: list[int] | None = None
    keeps: list[int] | None = None
    budgets: list[int] = field(default_factory=lambda: list(POOL_BUDGETS))
    temperature: float = 0.7
    top_p: float = 1.0
    anneal: str = "paper"
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    reward_model: str | None = None
    judge_model: str | None = None
    judge_prompt: str = DEFAULT_JUDGE_PROMPT


@dataclass
class Plan:
    """The validated options with the defaults that depend on them filled in."""

    opts: BenchOptions
    methods: list[str]
    thresholds: list[float]
    prune_ats: list[int]
    keeps: list[int]
    budgets: list[int]
    """Sweep: pool evaluation points (< max_new_tokens)."""


def default_prune_at(max_new_tokens: int) -> int:
    """The largest of 16, 32, 64, 128 within half the token limit (the paper prunes at 64 or 128)."""
    fits = [b for b in (16, 32, 64, 128) if b <= max_new_tokens / 2]
    return max(fits) if fits else max(1, max_new_tokens // 2)


def validate(opts: BenchOptions) -> Plan:
    """One-line ``UserError`` for any bad option, before anything is loaded."""
    if opts.model and opts.endpoint:
        raise UserError("give either --model or --endpoint, not both")
    if opts.mode not in ("live", "sweep"):
        raise UserError(f"--mode must be live or sweep (got {opts.mode!r})")
    methods = list(dict.fromkeys(m.strip() for m in opts.methods if m.strip()))
    if methods == ["all"]:
        methods = [m for m in METHODS if runs_in(m, opts.mode)]
    if not methods:
        raise UserError("--methods is empty")
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(METHODS)} (or all)")
        refusal = mode_refusal(m, opts.mode)
        if refusal:
            raise UserError(refusal)
    for name, value in (
        ("--n", opts.n),
        ("--max-new-tokens", opts.max_new_tokens),
        ("--parallel", opts.parallel),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1 (got {value})")
    if opts.limit is not None and opts.limit < 1:
        raise UserError(f"--limit must be at least 1 (got {opts.limit})")
    MethodConfig(  # range checks of the shared knobs, with the library's messages
        n=opts.n,
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        anneal=opts.anneal,  # type: ignore[arg-type]
    )
    for t in opts.thresholds or []:
        if not 0.0 <= t <= 1.0:
            raise UserError(f"--threshold must be within [0, 1] (got {t})")
    for b in [*(opts.prune_ats or []), *opts.budgets]:
        if b < 1:
            raise UserError(f"--prune-at and --budgets must be at least 1 (got {b})")
    pruning = any(m in PRUNING for m in methods)
    if pruning:
        for b in opts.prune_ats or []:
            if b >= opts.max_new_tokens:
                raise UserError(
                    f"--prune-at must be below --max-new-tokens (got {b} >= {opts.max_new_tokens})"
                )
        for k in opts.keeps or []:
            if not 1 <= k <= opts.n:
                raise UserError(f"--keep must be within 1..--n (got {k}, n={opts.n})")
    if "rm-best-of-n" in methods and not opts.reward_model:
        raise UserError("rm-best-of-n needs --reward-model PATH (an HF sequence-classification reward model)")
    if opts.out.exists() and not opts.out.is_dir():
        raise UserError(f"--out {opts.out} exists and is not a directory")
    live = opts.mode == "live"
    thresholds = list(opts.thresholds or ([0.98] if live else SWEEP_THRESHOLDS))
    prune_ats = list(opts.prune_ats or [default_prune_at(opts.max_new_tokens)])
    keeps = list(opts.keeps or [max(1, opts.n // 4)])
    budgets = sorted({b for b in [*opts.budgets, *prune_ats] if b < opts.max_new_tokens})
    if not live:
        keeps = list(opts.keeps or (sample_counts(opts.n)[:-1] or [1]))
        prune_ats = list(opts.prune_ats or budgets)
        if pruning and not prune_ats:
            raise UserError(
                f"no pruning budget below --max-new-tokens {opts.max_new_tokens}: give --prune-at or --budgets"
            )
    return Plan(opts, methods, thresholds, prune_ats, keeps, budgets)


def model_label(model: str | None) -> str:
    """The model's name in result lines (a folder or file name, a hub name, or the embedded model's)."""
    if model is None:
        from sgl_adaptive.model_store import DEFAULT_MODEL

        return DEFAULT_MODEL.name
    path = Path(model).expanduser()
    if path.is_file():
        return path.stem
    return path.name if path.exists() else model


def endpoint_model_label(backend: Any) -> str:
    model_path = str(getattr(backend, "model_info", {}).get("model_path", "") or "server")
    return Path(model_path.rstrip("/")).name or model_path


# ---- result lines ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What makes lines comparable: same model, data, mode, token limit (and pool in a sweep)."""

    model: str
    dataset: str
    split: str
    task: str
    mode: str
    max_new_tokens: int
    pool: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def line_key(family: Family, qid: str, method: str, config: dict[str, Any]) -> str:
    ident = {**family.as_dict(), "method": method, "config": config}
    ident.pop("max_new_tokens")  # already in the configs; keeps greedy shared across --n
    return f"{qid}:{method}:{config_hash(ident)}"


def new_line(family: Family, item: Item, method: str, config: dict[str, Any], top_n: int) -> dict[str, Any]:
    return {
        "key": line_key(family, item.qid, method, config),
        "kind": "result",
        **family.as_dict(),
        "family": config_hash(family.as_dict()),
        "qid": item.qid,
        "index": item.index,
        "method": method,
        "label": label(method, config),
        "config": config,
        "top_n": top_n,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- running -------------------------------------------------------------------------------------------


class Progress:
    """A rich progress bar with ETA on stderr (or nothing when the total is 0)."""

    def __init__(self, console: Console, description: str, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.bar.add_task(description, total=total)

    def __enter__(self) -> Progress:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)


def for_each(items: list[Any], work: Callable[[Any], None], parallel: int) -> None:
    """``work(item)`` for every item, ``parallel`` at a time; the first error stops the rest."""
    if parallel <= 1:
        for item in items:
            work(item)
        return
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="bench")
    try:
        futures = [pool.submit(work, item) for item in items]
        for future in futures:
            future.result()
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def load_scorers(opts: BenchOptions, task: str, console: Console) -> tuple[Any, Any]:
    """The reward model of rm-best-of-n and the judge of general prompts (same model when the same path)."""
    from .reward import RewardModel, make_judge

    reward = judge_rm = None
    if opts.reward_model:
        with console.status(f"loading reward model {opts.reward_model} …"):
            reward = RewardModel(opts.reward_model, opts.device)
    if task == "general":
        path = opts.judge_model or opts.reward_model
        if not path:
            raise UserError("general prompts are judged by a reward model: give --judge-model PATH")
        if reward is not None and path == opts.reward_model:
            judge_rm = reward
        else:
            with console.status(f"loading judge model {path} …"):
                judge_rm = RewardModel(path, opts.device)
    return reward, (make_judge(judge_rm) if judge_rm is not None else None)


def run_bench(opts: BenchOptions, console: Console | None = None, argv: Iterable[str] | None = None) -> Path:
    """Run (or resume) a bench into ``opts.out`` and print its report; returns the output folder."""
    console = console or Console(stderr=True)
    plan = validate(opts)
    data = load_dataset_items(opts.dataset, opts.split, opts.limit, opts.data_root, opts.task)
    if data.task == "general" and "majority" in plan.methods:
        raise UserError("majority needs answers to vote on: use it on gsm8k or math datasets")
    if data.task == "general" and not (opts.judge_model or opts.reward_model):
        raise UserError("general prompts are judged by a reward model: give --judge-model PATH")
    opts.out.mkdir(parents=True, exist_ok=True)
    results = JsonlStore(opts.out / RESULTS)
    JsonlStore(opts.out / RUNS).append(
        {
            "key": f"run-{time.time_ns()}",
            "time": _now(),
            "argv": list(argv if argv is not None else sys.argv),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(opts).items()},
        }
    )
    backend = None
    if opts.endpoint:
        backend = _load_backend(opts, console)
        model = endpoint_model_label(backend)
    else:
        model = model_label(opts.model)
    runner = _run_live if opts.mode == "live" else _run_sweep
    runner(plan, data, model, backend, results, console)
    from .report import write_report

    write_report(opts.out)
    return opts.out


def _load_backend(opts: BenchOptions, console: Console) -> Any:
    from sgl_adaptive.runner import load_backend

    what = f"connecting to {opts.endpoint} …" if opts.endpoint else "loading the model …"
    with console.status(what):
        return load_backend(
            opts.model, opts.endpoint, seed=opts.seed, device=opts.device, dtype=opts.dtype, console=console
        )


def _seed(plan: Plan, backend: Any) -> int | None:
    """Reseed per run when questions run one at a time; under --parallel a reseed would reset the seed
    sequence of the questions in flight, so the backend is seeded once instead."""
    if plan.opts.parallel <= 1:
        return plan.opts.seed
    if hasattr(backend, "reseed"):
        backend.reseed(plan.opts.seed)
    return None


def _base(opts: BenchOptions) -> dict[str, Any]:
    return {
        "n": opts.n,
        "max_new_tokens": opts.max_new_tokens,
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "anneal": opts.anneal,
        "seed": opts.seed,
    }


def _run_live(
    plan: Plan, data: Dataset, model: str, backend: Any, results: JsonlStore, console: Console
) -> None:
    opts = plan.opts
    family = Family(model, data.name, data.split, data.task, "live", opts.max_new_tokens)
    jobs = live_jobs(
        plan.methods,
        _base(opts),
        plan.thresholds,
        plan.prune_ats,
        plan.keeps,
        Path(opts.reward_model.rstrip("/")).name if opts.reward_model else None,
        opts.judge_prompt,
    )
    todo = [
        (item, [(m, c) for m, c in jobs if line_key(family, item.qid, m, c) not in results])
        for item in data.items
    ]
    todo = [(item, pending) for item, pending in todo if pending]
    total = sum(len(p) for _, p in todo)
    if not total:
        console.print(f"nothing to run: all {len(data.items) * len(jobs)} lines are in {results.path}")
        return
    backend = backend or _load_backend(opts, console)
    reward, judge = load_scorers(opts, data.task, console)
    ctx = LiveContext(backend, _seed(plan, backend), judge_config(opts.judge_prompt), reward, judge)
    console.print(
        f"{total} runs to do ({len(data.items)} questions, {len(jobs)} method configs) → {results.path}"
    )
    with Progress(console, "live", total) as progress:

        def work(entry: tuple[Item, list[tuple[str, dict[str, Any]]]]) -> None:
            item, pending = entry
            try:
                for method, config in pending:
                    line = new_line(family, item, method, config, config.get("n", 1))
                    line.update(run_live(ctx, item, method, config), time=_now())
                    results.append(line)
                    progress.advance()
            finally:
                ctx.forget(item)

        for_each(todo, work, opts.parallel)


# ---- sweep ---------------------------------------------------------------------------------------------


class _Recorder:
    """Wraps a program so ``run_program`` runs it and the request records stay readable afterwards."""

    def __init__(self, program: Any) -> None:
        self.program = program
        self.records: list[Any] = []

    def run(self, **kwargs: Any) -> Any:
        state = self.program.run(**kwargs)
        if state.error() is None:
            self.records = list(state.ret_value.meter.records)
        return state


def draw_pool(backend: Any, item: Item, cfg: MethodConfig, budgets: tuple[int, ...]) -> dict[str, Any]:
    """One scored pool for ``item``: candidates with texts and scores, the prompt and evaluation-turn
    sizes (for FLOPs estimates), the real costs and the model shape."""
    from sgl_adaptive.programs import sample_pool
    from sgl_adaptive.runner import run_program

    recorder = _Recorder(sample_pool)
    result = run_program(
        recorder,
        item.prompt,
        backend,
        cfg,
        "pool",
        budgets=budgets,
        evaluate=True,
        free_scorers=TRAINING_FREE,
    )
    sample_prompts = [r.prompt_tokens for r in recorder.records if r.kind == "sample"]
    shape = getattr(backend, "model_shape", None)
    per_eval = result.costs.eval_prefill_per_eval
    return {
        "candidates": [c.to_dict() for c in result.candidates],
        "prompt_tokens": min(sample_prompts) if sample_prompts else 0,
        "eval_tokens": round(per_eval) if per_eval is not None else 0,
        "shape": dataclasses.asdict(shape) if shape is not None else None,
        "costs": dataclasses.asdict(result.costs),
    }


def build_pool(
    record: dict[str, Any],
    item: Item,
    qualities: list[float],
    rm: dict[str, Any] | None = None,
    judge: dict[str, Any] | None = None,
) -> Pool:
    """A ``sweep.Pool`` from the stored records of one question."""
    from sgl_adaptive.costs import ModelShape

    samples = []
    for i, c in enumerate(record["candidates"]):
        extra: dict[str, Any] = {}
        if rm is not None:
            extra.update(rm=rm["scores"][i], rm_tokens=rm["tokens"][i], rm_flops=rm["flops"][i])
        if judge is not None:
            extra.update(judge=judge["scores"][i], judge_prefill=judge["prefill"][i])
        samples.append(
            PoolSample(
                tokens=c["tokens"],
                finished=c["finished"],
                scores=tuple((int(t), float(s)) for t, s in c["scores"]),
                quality=qualities[i],
                answer=answer_key(item.task, c["text"]),
                temperature=c["temperature"],
                free_scores={
                    name: tuple((int(t), float(v)) for t, v in values)
                    for name, values in c.get("free_scores", {}).items()
                },
                **extra,
            )
        )
    shape = ModelShape(**record["shape"]) if record.get("shape") else None
    return Pool(tuple(samples), record["prompt_tokens"], record["eval_tokens"], shape)


def _run_sweep(
    plan: Plan, data: Dataset, model: str, backend: Any, results: JsonlStore, console: Console
) -> None:
    opts = plan.opts
    pools = JsonlStore(opts.out / POOLS)
    anneal = opts.anneal == "paper"
    pool_config = {
        **_base(opts),
        "anneal_best_of_n": anneal,
        "budgets": plan.budgets,
        "selfeval": MethodConfig().selfeval.prompt,
        "free_scorers": list(TRAINING_FREE),  # pools drawn before these were recorded are not reused
    }
    pool_id = config_hash({"model": model, "dataset": data.name, "split": data.split, **pool_config})
    family = Family(model, data.name, data.split, data.task, "sweep", opts.max_new_tokens, pool_id)
    rm_name = Path(opts.reward_model.rstrip("/")).name if opts.reward_model else None
    judge_name = Path((opts.judge_model or opts.reward_model or "").rstrip("/")).name or None
    grid = sweep_grid(
        plan.methods,
        opts.n,
        plan.thresholds,
        plan.prune_ats,
        plan.keeps,
        default_prune_at(opts.max_new_tokens) if opts.prune_ats is None else opts.prune_ats[0],
        max(1, opts.n // 4) if opts.keeps is None else opts.keeps[0],
    )
    grid = [(m, _sweep_config(m, c, opts, rm_name)) for m, c in grid]
    todo = [
        item for item in data.items if any(line_key(family, item.qid, m, c) not in results for m, c in grid)
    ]
    if not todo:
        console.print(f"nothing to run: all {len(data.items) * len(grid)} sweep lines are in {results.path}")
        return
    keys = {
        "pool": lambda q: f"{q}:pool:{pool_id}",
        "rm": lambda q: f"{q}:rm:{config_hash([pool_id, rm_name])}",
        "judge": lambda q: f"{q}:judge:{config_hash([pool_id, opts.judge_prompt])}",
        "quality": lambda q: f"{q}:quality:{config_hash([pool_id, judge_name])}",
    }
    need_rm = "rm-best-of-n" in plan.methods
    need_judge = "judge-best-of-n" in plan.methods
    need_backend = any(keys["pool"](i.qid) not in pools for i in todo) or (
        need_judge and any(keys["judge"](i.qid) not in pools for i in todo)
    )
    if need_backend:
        backend = backend or _load_backend(opts, console)
    reward, judge = load_scorers(opts, data.task, console)
    seed = _seed(plan, backend) if backend is not None else opts.seed
    cfg = MethodConfig(
        n=opts.n,
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        anneal=opts.anneal,  # type: ignore[arg-type]
        anneal_best_of_n=anneal,
        seed=seed,
    )
    judge_cfg = dataclasses.replace(cfg, selfeval=judge_config(opts.judge_prompt))
    console.print(
        f"{len(todo)} questions to sweep (pool of {opts.n}, {len(grid)} configurations each) → {results.path}"
    )
    lock = threading.Lock()

    def stored(kind: str, item: Item, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = keys[kind](item.qid)
        record = pools.get(key)
        if record is None:
            record = {"key": key, "kind": kind, "qid": item.qid, **make(), "time": _now()}
            pools.append(record)
        return record

    with Progress(console, "sweep", len(todo)) as progress:

        def work(item: Item) -> None:
            pool_rec = stored("pool", item, lambda: draw_pool(backend, item, cfg, tuple(plan.budgets)))
            texts = [c["text"] for c in pool_rec["candidates"]]
            if data.task == "general":
                qualities = stored("quality", item, lambda: {"values": grade(item, texts, judge)})["values"]
            else:
                qualities = grade(item, texts)
            rm = judge_rec = None
            if need_rm:
                rm = stored("rm", item, lambda: dataclasses.asdict(reward.score(item.prompt, texts)))
            if need_judge:
                judge_rec = stored(
                    "judge", item, lambda: _judge_pool(backend, item, texts, pool_rec, judge_cfg)
                )
            pool = build_pool(pool_rec, item, qualities, rm, judge_rec)
            with lock:  # lines of one question stay together
                for method, config in grid:
                    line = new_line(family, item, method, config, pool.n)
                    if line["key"] in results:
                        continue
                    out = simulate(pool, method, config)
                    chosen = pool_rec["candidates"][out.chosen]
                    if method == "greedy":  # the base is the pool's first sample: greedy when annealed
                        line["label"] = f"pool sample 0, T={chosen['temperature']:g}"
                    line.update(
                        quality=out.quality,
                        correct=bool(out.quality) if data.task != "general" else None,
                        answer=answer_key(item.task, chosen["text"]),
                        reference=item.reference if data.task != "general" else None,
                        chosen=out.chosen,
                        score=out.score,
                        drawn=len(out.candidates),
                        costs=costs_dict(out.costs, estimated=True),
                        pool_wall_s=pool_rec["costs"]["wall_s"],
                        time=_now(),
                    )
                    if out.matched_tokens is not None:  # budget-matched: the tokens of its pruning
                        line["matched_tokens"] = out.matched_tokens
                    results.append(line)
            progress.advance()

        for_each(todo, work, opts.parallel)


def _sweep_config(
    method: str, config: dict[str, Any], opts: BenchOptions, rm_name: str | None
) -> dict[str, Any]:
    config = {**config, "max_new_tokens": opts.max_new_tokens}
    if method == "rm-best-of-n":
        config["reward_model"] = rm_name
    if method == "judge-best-of-n":
        config["judge_prompt"] = opts.judge_prompt
    return config


def _judge_pool(
    backend: Any, item: Item, texts: list[str], pool_rec: dict[str, Any], cfg: MethodConfig
) -> dict[str, Any]:
    """Zero-shot judge scores of the pool's responses, with each judge request's new prompt tokens
    as if the response were cached (its prompt length minus the prompt and the response)."""
    from .judge import judge_texts

    out = judge_texts(backend, item.prompt, texts, cfg)
    p = pool_rec["prompt_tokens"]
    prefill = [
        max(1, prompt_tokens - p - c["tokens"])
        for (_, prompt_tokens), c in zip(out, pool_rec["candidates"], strict=True)
    ]
    return {"scores": [s for s, _ in out], "prefill": prefill}


def interrupted_exit(console: Console, out: Path) -> None:
    """After Ctrl-C: say how to resume, and leave at once (worker threads are not waited for)."""
    console.print(f"interrupted: finished lines are in {out / RESULTS}; rerun the same command to resume")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
