"""``finetune data``: on-policy samples -> rewards -> pairwise labels -> examples, split by prompt.

Layout of the output directory:

- ``samples.jsonl``: one line per prompt (its K samples and their rewards), appended and flushed per
  prompt. A rerun skips the prompt ids already there (resumable); nothing else is expensive.
- ``train.jsonl``, ``heldout.jsonl``: the examples, rebuilt from ``samples.jsonl`` on every run (labels,
  truncations and the split are cheap and deterministic, so the tie margin or budgets can change
  without resampling). The held-out part is chosen by a hash of the prompt id: all samples of a
  prompt land on the same side, and a prompt never changes sides as the data grows.
- ``manifest.json``: provenance (model, reward, seed, sampling settings, source) and counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.data import read_jsonl, stable_fraction
from sgl_adaptive.errors import PromptTooLongError, UserError
from sgl_adaptive.finetune.examples import make_examples
from sgl_adaptive.finetune.labels import KEEP_LABEL, default_tie_margin, pairwise_labels
from sgl_adaptive.finetune.prompts import PromptItem
from sgl_adaptive.finetune.rewards import Reward

FORMAT = "sgl-adaptive-finetune-data/1"
SAMPLES, TRAIN, HELDOUT, MANIFEST = "samples.jsonl", "train.jsonl", "heldout.jsonl", "manifest.json"
HELDOUT_SALT = "sgl-adaptive-finetune-heldout"


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are drawn: the policy's normal sampling settings (paper: on-policy, ≥ 2 per prompt)."""

    samples_per_prompt: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise UserError(f"--samples-per-prompt must be at least 2 (got {self.samples_per_prompt})")


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed: the same prompt draws the same samples whatever the order or the resume point."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()[:4], "big")


def is_heldout(prompt_id: str, fraction: float) -> bool:
    return stable_fraction(prompt_id, salt=HELDOUT_SALT) < fraction


def done_ids(path: Path) -> set[str]:
    """Prompt ids already sampled (a torn last line, from an interrupted write, is dropped)."""
    if not path.is_file():
        return set()
    ids, good = set(), 0
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # a write cut short, even if it parses
            try:
                ids.add(json.loads(line)["id"])
                good += len(line)
            except (ValueError, KeyError):
                break
    if good < path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(good)
    return ids


def sample_prompt(
    item: PromptItem, backend: Any, settings: SamplingSettings, reward: Reward, *, reseed: bool = True
) -> dict[str, Any]:
    """K on-policy samples of one prompt through the library's ``sample_pool`` program, with rewards.

    ``reseed`` False (several prompts in flight on one in-process backend, where a reseed would race):
    the backend keeps its base seed; its request seeds hash the prompt text, so the samples stay
    deterministic under that seed for a freshly loaded backend, whatever the order or worker count.
    """
    from sgl_adaptive.programs.pool import sample_pool
    from sgl_adaptive.runner import run_program

    seed = prompt_seed(settings.seed, item.id) if reseed else None
    config = MethodConfig(
        n=settings.samples_per_prompt,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        anneal="none",
        seed=seed,
    )
    result = run_program(sample_pool, item.prompt, backend, config, name="pool", evaluate=False)
    # Forks draw their seeds in arrival order, so a seed fixes the multiset of samples, not which fork
    # holds which: store them in a canonical (hash) order to make the file identical under a seed.
    candidates = sorted(
        result.candidates, key=lambda c: (hashlib.sha256(c.text.encode()).hexdigest(), c.tokens)
    )
    rewards = reward(item, [c.text for c in candidates])
    return {
        "id": item.id,
        "prompt": item.prompt,
        "reference": item.reference,
        "seed": settings.seed if seed is None else seed,
        "samples": [
            {
                "index": i,
                "text": c.text,
                "tokens": c.tokens,
                "finished": c.finished,
                "temperature": c.temperature,
                "reward": r,
            }
            for i, (c, r) in enumerate(zip(candidates, rewards, strict=True))
        ],
    }


def sample_all(
    items: Sequence[PromptItem],
    backend: Any,
    settings: SamplingSettings,
    reward: Reward,
    out_dir: Path,
    *,
    workers: int = 1,
    on_done: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Sample every prompt not yet in ``samples.jsonl``; append and flush one line per prompt.
    Returns (prompts sampled now, prompts skipped as too long)."""
    path = out_dir / SAMPLES
    todo = [it for it in items if it.id not in done_ids(path)]
    sampled = skipped = 0

    def one(item: PromptItem) -> dict[str, Any] | None:
        try:
            return sample_prompt(item, backend, settings, reward, reseed=workers == 1)
        except PromptTooLongError:
            return None

    with path.open("a", encoding="utf-8") as handle:
        results: Iterator[dict[str, Any] | None]
        if workers > 1:
            pool = ThreadPoolExecutor(workers)
            results = pool.map(one, todo)
        else:
            pool, results = None, map(one, todo)
        try:
            for record in results:
                if record is None:
                    skipped += 1
                else:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    handle.flush()
                    sampled += 1
                if on_done:
                    on_done(1)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return sampled, skipped


def label_and_split(
    out_dir: Path,
    tokenizer: Any,
    *,
    budgets: Sequence[int],
    tie_margin: float | None,
    heldout_fraction: float,
    verifier: bool,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Rebuild ``train.jsonl``/``heldout.jsonl`` from ``samples.jsonl``; return the counts."""
    records = list(read_jsonl(out_dir / SAMPLES))
    if not records:
        raise UserError(f"no samples in {out_dir / SAMPLES}")
    all_rewards = [s["reward"] for r in records for s in r["samples"]]
    margin = default_tie_margin(all_rewards, verifier) if tie_margin is None else tie_margin
    ids = [r["id"] for r in records]
    heldout = {i for i in ids if is_heldout(i, heldout_fraction)}
    if heldout_fraction > 0 and not heldout and len(ids) >= 2:  # tiny runs: hold out the lowest hash
        heldout = {min(ids, key=lambda i: stable_fraction(i, salt=HELDOUT_SALT))}
    prov = {**provenance, "tie_margin": margin}
    counts: dict[str, Counter[str]] = {"train": Counter(), "heldout": Counter()}
    tmp = {split: out_dir / f".{name}.tmp" for split, name in (("train", TRAIN), ("heldout", HELDOUT))}
    handles = {split: p.open("w", encoding="utf-8") for split, p in tmp.items()}
    try:
        for record in records:
            split = "heldout" if record["id"] in heldout else "train"
            labels = pairwise_labels([s["reward"] for s in record["samples"]], margin)
            for ex in make_examples(record, labels, budgets, tokenizer, prov):
                handles[split].write(json.dumps({**ex, "split": split}, ensure_ascii=False) + "\n")
                budget = "full" if ex["truncated_tokens"] is None else str(ex["truncated_tokens"])
                counts[split][f"{budget}:{ex['label']}"] += 1
    finally:
        for h in handles.values():
            h.close()
    for split, name in (("train", TRAIN), ("heldout", HELDOUT)):
        os.replace(tmp[split], out_dir / name)
    return {
        "prompts": len(ids),
        "heldout_prompts": len(heldout),
        "samples": len(all_rewards),
        "mean_reward": sum(all_rewards) / len(all_rewards),
        "tie_margin": margin,
        "examples": {split: sum(c.values()) for split, c in counts.items()},
        "keep_fraction": {
            split: (sum(v for k, v in c.items() if k.endswith(":" + KEEP_LABEL)) / max(1, sum(c.values())))
            for split, c in counts.items()
        },
        "by_budget_and_label": {split: dict(sorted(c.items())) for split, c in counts.items()},
    }


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: malformed manifest ({exc})") from None


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def check_resumable(old: dict[str, Any] | None, generation: dict[str, Any], out_dir: Path) -> None:
    """Appending to data drawn with other settings would mix distributions: refuse."""
    if old is None:
        return
    if old.get("format") != FORMAT:
        raise UserError(f"{out_dir} holds data of another format ({old.get('format')!r}); use a new --out")
    differ = sorted(k for k in generation if old.get("generation", {}).get(k) != generation[k])
    if differ:
        raise UserError(
            f"{out_dir} holds samples drawn with other settings ({', '.join(differ)} differ); "
            "use a new --out, or the same settings to resume"
        )


def generation_settings(
    model: str, reward: Reward, settings: SamplingSettings, source: dict[str, Any]
) -> dict[str, Any]:
    """What determines the samples and rewards (must match to resume)."""
    return {"model": model, "reward": reward.name, "sampling": asdict(settings), "prompts": source}


def build_data(
    items: Sequence[PromptItem],
    out_dir: Path,
    *,
    backend_factory: Callable[[], Any],
    tokenizer_factory: Callable[[Any | None], tuple[Any, str]],
    model_id: str,
    reward: Reward,
    settings: SamplingSettings,
    source: dict[str, Any],
    budgets: Sequence[int],
    tie_margin: float | None,
    heldout_fraction: float,
    workers: int = 1,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> dict[str, Any]:
    """Sample what is missing (loading the backend only then), relabel everything, write the manifest.

    ``tokenizer_factory(backend or None) -> (tokenizer, tokenizer path)`` gives the policy's tokenizer
    (token budgets are counted in it). ``progress(total)`` returns a callback advanced per prompt."""
    if hasattr(reward, "check"):
        reward.check(items)
    out_dir.mkdir(parents=True, exist_ok=True)
    generation = generation_settings(model_id, reward, settings, source)
    old = read_manifest(out_dir)
    check_resumable(old, generation, out_dir)
    todo = [it for it in items if it.id not in done_ids(out_dir / SAMPLES)]
    backend, sampled, skipped = None, 0, 0
    if todo:
        backend = backend_factory()
        write_manifest(out_dir, {"format": FORMAT, "generation": generation, **(old or {})})
        sampled, skipped = sample_all(
            todo,
            backend,
            settings,
            reward,
            out_dir,
            workers=workers,
            on_done=progress(len(todo)) if progress else None,
        )
    tokenizer, tokenizer_path = tokenizer_factory(backend)
    if backend is not None and hasattr(backend, "shutdown"):
        backend.shutdown()
    provenance = {
        "model": model_id,
        "reward": reward.name,
        "sampling": {k: v for k, v in asdict(settings).items() if k != "seed"},
        "base_seed": settings.seed,
    }
    stats = label_and_split(
        out_dir,
        tokenizer,
        budgets=budgets,
        tie_margin=tie_margin,
        heldout_fraction=heldout_fraction,
        verifier=reward.verifier,
        provenance=provenance,
    )
    manifest = {
        "format": FORMAT,
        "generation": generation,
        "tokenizer": tokenizer_path,
        "labels": {
            "tie_margin": stats["tie_margin"],
            "tie_margin_given": tie_margin,
            "budgets": list(budgets),
            "heldout_fraction": heldout_fraction,
            "verifier": reward.verifier,
        },
        "counts": stats,
        "last_run": {"sampled": sampled, "skipped_too_long": skipped},
    }
    write_manifest(out_dir, manifest)
    return manifest
