"""``bench rescore``: a sweep's pools re-scored offline by another self-evaluator, then replayed.

sgl-adaptive bench rescore --pools DIR/pools.jsonl --model MODEL --out DIR2 [--dtype] [--device]

Every self-evaluation of a pool (``programs/pool.py``: each sample scored after its first b generated
tokens, for each budget b it reached, and at its end) is recomputed by MODEL with one packed forward per
question (``finetune.packing.score_packed``), on the text the program sent: the dataset's prompt as the
user turn (``bench.datasets.Item.prompt``, looked up by question id in the dataset of the sweep's
``DIR/runs.jsonl``), the response so far, the evaluation turn. Everything else is kept (texts, token
counts, training-free scores, reward-model and judge records, cost inputs). DIR2/pools.jsonl holds the
re-scored pools under their own keys (each sample keeps its former scores as ``original_scores``; each
pool names MODEL in ``rescored_by``), DIR2/rescore.json the provenance and the size of the change.
Then every sweep recorded in DIR/runs.jsonl is replayed from DIR2's pools (never generating: a
question without a pool is left out with a notice) into DIR2/results.jsonl and the report;
``bench report DIR2`` re-prints it. Rerunning the same command resumes.

The prefix at budget b: pools store each sample's text, not its token ids, so the text is re-encoded
with the tokenizer the pool was generated with and cut after b tokens
(``finetune.examples.truncate_response``). That is the program's own prefix when the generated tokens
are the tokenizer's encoding of the text. A sample whose re-encoding has another length than the
tokens it generated, or whose text holds U+FFFD (a character cut between two tokens), was generated
otherwise: its prefixes are approximations, and it is marked ``prefix_faithful: false`` (counted in
rescore.json). The in-process backend scored such a sample on its generated ids; an SGLang server
re-encodes the text too, so there only the cut can differ.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from sgl_adaptive.errors import UserError

from .harness import POOLS, RESULTS, RUNS, BenchOptions, _now, model_label, validate
from .store import JsonlStore, config_hash, read_lines

MANIFEST = "rescore.json"
REPLAY_IGNORES = ("out", "parallel", "device", "dtype")
"""Options of a recorded sweep that do not change its pools or lines (dropped when deduplicating)."""


@dataclasses.dataclass
class RescoreOptions:
    """Everything ``bench rescore`` takes."""

    pools: Path
    model: str
    out: Path
    tokenizer: str | None = None
    """Tokenizer that generated the pools (it cuts the prefixes); default: the sweep's model folder, else
    MODEL's."""
    dataset: str | None = None
    """Overrides the recorded ``--dataset`` (the prompts; needed when DIR has no runs.jsonl)."""
    data_root: str | None = None
    device: str | None = None
    dtype: str = "auto"


class MissingPoolError(UserError):
    """A replayed sweep asked for a pool (or judge scores) that the re-scored pools do not hold."""


class NoGeneration:
    """The replay's backend: any use means a pool would have to be generated, which a rescore never does."""

    def __getattr__(self, name: str) -> Any:
        raise MissingPoolError("a pool this sweep needs is not in the re-scored pools")


# ---- reading the source ----------------------------------------------------------------------------------


def recorded_sweeps(folder: Path) -> list[dict[str, Any]]:
    """The run lines of the distinct sweeps recorded in ``folder/runs.jsonl``, in order."""
    seen: set[str] = set()
    runs = []
    for run in read_lines(folder / RUNS):
        options = run.get("options")
        if not isinstance(options, dict) or options.get("mode") != "sweep":
            continue
        ident = config_hash({k: v for k, v in options.items() if k not in REPLAY_IGNORES})
        if ident not in seen:
            seen.add(ident)
            runs.append(run)
    return runs


def dataset_specs(runs: Sequence[dict[str, Any]], opts: RescoreOptions) -> list[tuple[Any, ...]]:
    """(dataset, split, data_root, task) of each recorded sweep, with the command's overrides."""
    specs = []
    for run in runs:
        o = run["options"]
        spec = (
            opts.dataset or o["dataset"],
            o.get("split"),
            opts.data_root or o.get("data_root"),
            o.get("task"),
        )
        if spec not in specs:
            specs.append(spec)
    if not specs and opts.dataset:
        specs.append((opts.dataset, None, opts.data_root, None))
    return specs


def load_items(specs: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """Question id -> ``Item`` over the datasets (their prompts are what the pools' programs sent)."""
    from .datasets import load_dataset_items

    items: dict[str, Any] = {}
    for name, split, data_root, task in specs:
        for item in load_dataset_items(name, split, None, data_root, task).items:
            items.setdefault(item.qid, item)
    return items


def pool_tokenizer_path(runs: Sequence[dict[str, Any]], explicit: str | None) -> str | None:
    """The tokenizer the pools were generated with: ``explicit``, else the recorded sweeps' one model
    folder when it is here (None: use the re-scoring model's)."""
    if explicit:
        return explicit
    models = {run["options"].get("model") for run in runs}
    if len(models) != 1 or any(run["options"].get("endpoint") for run in runs):
        return None
    model = models.pop()
    return str(model) if model and (Path(model) / "tokenizer_config.json").is_file() else None


# ---- prefixes and scores ---------------------------------------------------------------------------------


def prefix_texts(tokenizer: Any, candidate: dict[str, Any]) -> tuple[list[str], bool]:
    """The response text each of ``candidate``'s self-evaluations saw (its first t generated tokens, or
    all of it at its end), and whether the cut is faithful (the text re-encodes into as many tokens as
    were generated, an end of sequence not counted, and holds no U+FFFD)."""
    from sgl_adaptive.finetune.examples import truncate_response

    text, tokens = candidate["text"], int(candidate["tokens"])
    ids = tokenizer.encode(text, add_special_tokens=False)
    generated = tokens - 1 if candidate["finished"] else tokens
    faithful = len(ids) == generated and "\ufffd" not in text
    texts = []
    for t, _ in candidate["scores"]:
        cut = None if int(t) >= tokens else truncate_response(tokenizer, text, int(t), ids)
        texts.append(text if cut is None else cut)
    return texts, faithful


def pool_examples(
    record: dict[str, Any], prompt: str, tokenizer: Any
) -> tuple[list[dict[str, Any]], list[bool]]:
    """The packed scorer's examples of one pool (samples in order, evaluations in order) and each sample's
    faithfulness."""
    examples, faithful = [], []
    for c in record["candidates"]:
        texts, ok = prefix_texts(tokenizer, c)
        examples += [{"prompt_id": record["key"], "prompt": prompt, "text": t} for t in texts]
        faithful.append(ok)
    return examples, faithful


def rescored_record(
    record: dict[str, Any], scores: Sequence[float], faithful: Sequence[bool], provenance: dict[str, Any]
) -> dict[str, Any]:
    """``record`` with every sample's ``scores`` (and final ``score``) replaced by ``scores`` (flat, in
    ``pool_examples`` order); the former ones kept as ``original_scores``."""
    values = iter(scores)
    candidates = []
    for c, ok in zip(record["candidates"], faithful, strict=True):
        new = [[int(t), float(next(values))] for t, _ in c["scores"]]
        candidates.append(
            {
                **c,
                "score": new[-1][1] if new else c.get("score"),
                "scores": new,
                "original_scores": c["scores"],
                "prefix_faithful": ok,
            }
        )
    return {**record, "candidates": candidates, "rescored_by": {**provenance, "time": _now()}}


def change_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and the size of the score change over the re-scored pools."""
    diffs: list[float] = []
    samples = unfaithful = 0
    for record in records:
        for c in record["candidates"]:
            samples += 1
            unfaithful += not c.get("prefix_faithful", True)
            diffs += [
                abs(a[1] - b[1]) for a, b in zip(c["scores"], c.get("original_scores", []), strict=True)
            ]
    return {
        "pools": len(records),
        "samples": samples,
        "evaluations": len(diffs),
        "unfaithful_samples": unfaithful,
        "mean_abs_change": sum(diffs) / len(diffs) if diffs else None,
        "max_abs_change": max(diffs, default=None),
    }


# ---- the command -----------------------------------------------------------------------------------------


def _torch_dtype(opts: RescoreOptions) -> Any:
    from sgl_adaptive.backends.precision import default_dtype, parse_dtype
    from sgl_adaptive.devices import check_device
    from sgl_adaptive.finetune.scoring import default_device

    check_device(opts.device)
    try:
        return parse_dtype(opts.dtype) or default_dtype(opts.device or default_device())
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _check_manifest(out: Path, provenance: dict[str, Any]) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    fields = ("source", "model", "tokenizer", "dtype")
    if any(before.get(k) != provenance[k] for k in fields):
        what = ", ".join(f"{k} {before.get(k)}" for k in fields)
        raise UserError(f"{out} holds pools re-scored otherwise ({what}): give another --out")


def run_rescore(
    opts: RescoreOptions, console: Console | None = None, argv: Sequence[str] | None = None
) -> Path:
    """Re-score ``opts.pools`` into ``opts.out``, replay its sweeps there and print the report."""
    from sgl_adaptive.progress import ProgressDisplay, status

    console = console or Console(stderr=True)
    source = opts.pools
    if not source.is_file():
        raise UserError(f"--pools {source}: no such file (a sweep writes DIR/pools.jsonl)")
    if opts.out.exists() and not opts.out.is_dir():
        raise UserError(f"--out {opts.out} exists and is not a directory")
    if opts.out.resolve() == source.parent.resolve():
        raise UserError("--out must be another folder than the pools' (their scores are kept there)")
    records = list(read_lines(source))
    pools = [r for r in records if r.get("kind") == "pool"]
    if not pools:
        raise UserError(f"{source} holds no pool (write one with sgl-adaptive bench --mode sweep)")
    runs = recorded_sweeps(source.parent)
    specs = dataset_specs(runs, opts)
    if not specs:
        raise UserError(
            f"no sweep is recorded in {source.parent / RUNS}: give --dataset (the pools' questions)"
        )
    items = load_items(specs)
    missing = sorted({r["qid"] for r in pools} - set(items))
    if missing:
        raise UserError(
            f"{len(missing)} question(s) of {source} are not in the dataset ({', '.join(missing[:3])} …): "
            "give --dataset/--data-root"
        )
    dtype = _torch_dtype(opts)
    model_path = _model_path(opts.model, console)
    tokenizer_path = pool_tokenizer_path(runs, opts.tokenizer)
    provenance = {
        "source": str(source.resolve()),
        "model": opts.model,
        "model_path": model_path,
        "tokenizer": tokenizer_path or model_path,
        "dtype": str(dtype).removeprefix("torch."),
    }
    _check_manifest(opts.out, provenance)
    opts.out.mkdir(parents=True, exist_ok=True)
    if not (opts.out / MANIFEST).is_file():  # provenance first: a resumed run must re-score the same way
        (opts.out / MANIFEST).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    out_pools = JsonlStore(opts.out / POOLS)
    todo = [r for r in pools if r["key"] not in out_pools]
    with ProgressDisplay(console) as display:
        if todo:
            from sgl_adaptive.finetune.packing import score_packed
            from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm

            with status(console, f"loading {opts.model} …"):
                model, scorer_tokenizer = load_causal_lm(model_path, device=opts.device, dtype=dtype)
                cutter = _load_tokenizer(tokenizer_path) if tokenizer_path else scorer_tokenizer
            encoder = SelfEvalEncoder(scorer_tokenizer)
            display.print(f"prefixes cut with the tokenizer of {provenance['tokenizer']}")
            planned = [(r, *pool_examples(r, items[r["qid"]].prompt, cutter)) for r in todo]
            task = display.task("re-scoring", sum(len(ex) for _, ex, _ in planned), unit="evaluations")
            for record, examples, faithful in planned:
                scores = [s.score for s in score_packed(model, encoder, examples, on_prompt=task)]
                out_pools.append(rescored_record(record, scores, faithful, provenance))
        for record in records:
            if record.get("kind") != "pool" and "key" in record:
                out_pools.append(record)  # reward-model, judge and quality records: not self-evaluations
    rescored = [r for r in out_pools.records() if r.get("kind") == "pool"]
    manifest = {**provenance, "device": opts.device, "time": _now(), **change_summary(rescored)}
    (opts.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    console.print(
        f"re-scored {manifest['evaluations']} evaluations of {manifest['samples']} samples "
        f"({manifest['unfaithful_samples']} with approximate prefixes) → {opts.out / POOLS}",
        highlight=False,
        soft_wrap=True,
    )
    _record_runs(opts, runs, argv)
    replay(opts, runs, console)
    return opts.out


def _model_path(model: str, console: Console) -> str:
    """A LoRA adapter folder as it is, else ``model_store.resolve_model`` (one-line error if missing)."""
    from sgl_adaptive.model_store import resolve_model

    if (Path(model) / "adapter_config.json").is_file():
        return model
    return resolve_model(model, console=console)


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer {path!r}: {str(exc).strip().splitlines()[0]}") from None


def _record_runs(opts: RescoreOptions, runs: Sequence[dict[str, Any]], argv: Sequence[str] | None) -> None:
    """DIR2/runs.jsonl: the replayed sweeps' lines (so DIR2 can be re-scored in turn) and this command."""
    store = JsonlStore(opts.out / RUNS)
    for run in runs:
        store.append(run)
    options = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(opts).items()}
    store.append(
        {
            "key": f"rescore-{time.time_ns()}",
            "time": _now(),
            "argv": list(argv if argv is not None else sys.argv),
            "rescore": options,
        }
    )


# ---- replay ------------------------------------------------------------------------------------------------


def _sweep_labels(folder: Path) -> set[str]:
    return {
        str(r["model"]) for r in read_lines(folder / RESULTS) if r.get("mode") == "sweep" and "model" in r
    }


def replay_label(options: dict[str, Any], labels: set[str]) -> str:
    """The model name a recorded sweep gave its lines (part of its pools' keys): its own ``--model``'s
    label when its lines carry it, else the one model name of the source's sweep lines."""
    own = None if options.get("endpoint") else model_label(options.get("model"))
    if own is not None and (own in labels or not labels):
        return own
    if len(labels) == 1:
        return next(iter(labels))
    raise UserError(
        f"cannot tell which model name the sweep of {options.get('dataset')} gave its pools "
        f"(the source's sweep lines name {', '.join(sorted(labels)) or 'none'})"
    )


def replay_options(run: dict[str, Any], opts: RescoreOptions) -> BenchOptions:
    """A recorded sweep's ``BenchOptions``, writing into ``opts.out``, one question at a time."""
    fields = {f.name for f in dataclasses.fields(BenchOptions)}
    options = {k: v for k, v in run["options"].items() if k in fields}
    options.update(out=opts.out, parallel=1, endpoint=None, device=opts.device)
    if opts.dataset:
        options["dataset"] = opts.dataset
    if opts.data_root:
        options["data_root"] = opts.data_root
    return BenchOptions(**options)


def replay(opts: RescoreOptions, runs: Sequence[dict[str, Any]], console: Console) -> None:
    """Every recorded sweep replayed from the re-scored pools (``harness._run_sweep`` with a backend that
    refuses to generate), then the report of DIR2."""
    from .datasets import load_dataset_items
    from .harness import _run_sweep
    from .report import write_report

    if not runs:
        console.print(
            "no sweep options recorded: replay with sgl-adaptive bench --mode sweep --out "
            f"{opts.out} and the sweep's own options (its pools are found, nothing is generated)",
            highlight=False,
            soft_wrap=True,
        )
        return
    labels = _sweep_labels(opts.pools.parent)
    results = JsonlStore(opts.out / RESULTS)
    pooled = {r["qid"] for r in read_lines(opts.out / POOLS) if r.get("kind") == "pool"}
    for run in runs:
        bench = replay_options(run, opts)
        plan = validate(bench)
        data = load_dataset_items(bench.dataset, bench.split, bench.limit, bench.data_root, bench.task)
        what = " ".join(run.get("argv", [])[1:])
        unpooled = [item for item in data.items if item.qid not in pooled]
        if unpooled:  # an interrupted sweep
            console.print(
                f"{len(unpooled)} question(s) of the sweep {what} have no pool: left out",
                highlight=False,
                soft_wrap=True,
            )
            data = dataclasses.replace(data, items=[item for item in data.items if item.qid in pooled])
        try:
            _run_sweep(plan, data, replay_label(run["options"], labels), NoGeneration(), results, console)
        except MissingPoolError:
            console.print(
                f"stopped replaying the sweep {what}: a pool or judge record it needs is not in {opts.pools}",
                highlight=False,
                soft_wrap=True,
            )
    if len(results):
        write_report(opts.out)
