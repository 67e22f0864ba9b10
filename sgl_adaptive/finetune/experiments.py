"""The measurements that choose the training setting, all out of fold, from one activation cache:
the probe curve over layers (``probe_curve``) and top-k training cross-validated (``top_cv``). Each writes
its out-of-fold scores (JSONL, small enough to commit) and the selection report (``oof.oof_report``) as
JSON and markdown."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.activation_cache import ActivationCache
from sgl_adaptive.finetune.labels import KEEP_LABEL


def response_tokens(cache: ActivationCache) -> dict[tuple[str, int], int]:
    """(prompt id, sample) -> generated tokens, from the data folder the cache was built from (for the
    adaptive replay's token counts; empty when that folder is gone)."""
    from sgl_adaptive.data import read_jsonl

    data = Path(cache.manifest.get("data", ""))
    out: dict[tuple[str, int], int] = {}
    if (data / "samples.jsonl").is_file():
        for record in read_jsonl(data / "samples.jsonl"):
            for s in record["samples"]:
                out[(record["id"], int(s["index"]))] = int(s["tokens"])
    return out


def cached_examples(cache: ActivationCache) -> tuple[list[int], list[dict[str, Any]]]:
    """(example indices of the cached prompts, those examples with ``response_tokens``)."""
    tokens = response_tokens(cache)
    index = [i for n in cache.complete() for i in cache.groups[n]]
    examples = []
    for i in index:
        ex = dict(cache.examples[i])
        ex["response_tokens"] = tokens.get((ex["prompt_id"], int(ex["sample"])), 1)
        examples.append(ex)
    return index, examples


def write_report(
    out: Path, name: str, examples: Sequence[dict[str, Any]], scores: Sequence[float], extra: dict
):
    """``out/<name>.scores.jsonl``, ``.json`` (the report) and ``.md``; returns the report."""
    from sgl_adaptive.finetune.oof import format_oof_table, oof_report

    out.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "prompt_id": ex["prompt_id"],
                "sample": ex["sample"],
                "truncated_tokens": ex["truncated_tokens"],
                "score": round(float(s), 6),
            }
        )
        for ex, s in zip(examples, scores, strict=True)
    ]
    (out / f"{name}.scores.jsonl").write_text("\n".join(lines) + "\n")
    report = {**extra, "report": oof_report(examples, scores)}
    (out / f"{name}.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    (out / f"{name}.md").write_text(f"# {name}\n\n" + format_oof_table(report["report"]) + "\n")
    return report


def _json_safe(obj: Any) -> Any:
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def probe_curve(
    cache: ActivationCache,
    out: Path,
    *,
    layers: Sequence[int] | None = None,
    folds: int = 5,
    seed: int = 0,
    soft: bool = False,
    budgets: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Out-of-fold logistic probes on the state entering each cached layer at the answer positions
    (``answer_states``; layer j is transformers' ``hidden_states[j]``): one line per layer with pooled
    and within-prompt AUROC, Best-of-K and the weighted vote; the scores of each layer in ``out``.
    ``budgets`` ("full" and token counts) keeps those examples only, e.g. ("full",) for complete
    responses."""
    from sgl_adaptive.finetune.oof import oof_report
    from sgl_adaptive.finetune.probe import oof_probe_scores

    index, examples = cached_examples(cache)
    if not examples:
        raise UserError(f"{cache.root} has no cached prompt yet")
    states = [cache.load(n)["answer_states"] for n in cache.complete()]
    keep = np.arange(len(examples))
    if budgets is not None:
        names = ["full" if ex["truncated_tokens"] is None else str(ex["truncated_tokens"]) for ex in examples]
        keep = np.array([j for j, name in enumerate(names) if name in set(budgets)], dtype=int)
        if not len(keep):
            raise UserError(f"no cached example has a budget in {list(budgets)}")
        examples, index = [examples[j] for j in keep], [index[j] for j in keep]
    available = states[0].shape[1]
    layers = list(range(available)) if layers is None else list(layers)
    if any(not 0 <= j < available for j in layers):
        raise UserError(f"--layers must be within [0, {available - 1}] for this cache")
    suffix = "" if budgets is None else "-" + "-".join(budgets)
    labels = np.array([ex["label"] == KEEP_LABEL for ex in examples])
    targets = np.array([float(ex["soft_no"]) for ex in examples]) if soft else labels.astype(float)
    prompt_ids = [ex["prompt_id"] for ex in examples]
    rows = []
    for j in layers:
        start = time.monotonic()
        X = np.concatenate([s[:, j].float().numpy() for s in states])[keep]
        scores, l2s = oof_probe_scores(X, targets, prompt_ids, folds=folds, seed=seed, labels=labels)
        report = oof_report(examples, scores, folds=folds, seed=seed)
        s, b = report["summary"], report["best_of_n"]
        row = {
            "layer": j,
            "auroc": s["auroc"],
            "auroc_ci": s["auroc_ci"],
            "within_prompt_auroc": s["within_prompt_auroc"],
            "within_prompt_auroc_ci": s["within_prompt_auroc_ci"],
            "best_of_n": b["selected"],
            "selected_minus_first_ci": b["selected_minus_first_ci"],
            "weighted_vote": report["weighted_vote"]["reward"],
            "first_sample": b["first_sample"],
            "majority": b["majority"],
            "oracle": b["oracle"],
            "l2": l2s,
            "seconds": time.monotonic() - start,
        }
        rows.append(row)
        log(
            f"layer {j}: AUROC {row['auroc']:.3f}, within-prompt {row['within_prompt_auroc']:.3f}, "
            f"best-of-K {row['best_of_n']:.3f}, weighted vote {row['weighted_vote']:.3f} "
            f"(first {row['first_sample']:.3f}, majority {row['majority']:.3f}) [{row['seconds']:.0f} s]"
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / f"probe-layer{j}{suffix}.scores.jsonl").write_text(
            "".join(
                json.dumps({"i": i, "score": round(float(v), 6)}) + "\n"
                for i, v in zip(index, scores, strict=True)
            )
        )
    result = {
        "budgets": list(budgets) if budgets is not None else "all",
        "prompts": len(cache.complete()),
        "examples": len(examples),
        "target": "soft" if soft else "hard",
        "folds": folds,
        "layers": rows,
    }
    (out / f"probe-curve{suffix}.json").write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    return result


def top_cv(
    model_path: str,
    cache: ActivationCache,
    settings: Any,
    out: Path,
    name: str,
    *,
    folds: int = 5,
    seed: int = 0,
    train_prompts: int | None = None,
    dtype: Any = None,
    with_base: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Cross-validated top-k training (``top_train.cross_validate``) and its report, with the untrained
    model's scores on the same examples as the baseline (paired AUROC difference)."""
    from sgl_adaptive.finetune.oof import paired_auroc_ci
    from sgl_adaptive.finetune.top_train import (
        TopStack,
        check_cache_model,
        cross_validate,
        load_base,
        score_prompts,
    )

    check_cache_model(cache, model_path)
    base, encoder = load_base(model_path, dtype=dtype)
    index, examples = cached_examples(cache)
    memo: dict[int, Any] = {}
    start = time.monotonic()
    result = cross_validate(
        base,
        encoder,
        cache,
        settings,
        folds=folds,
        seed=seed,
        train_prompts=train_prompts,
        memo=memo,
        log=log,
    )
    scores = [result["scores"][i].score for i in index]
    extra: dict[str, Any] = {
        "settings": asdict(settings),
        "folds": result["folds"],
        "train_prompts": train_prompts,
        "seconds": time.monotonic() - start,
        "cache": {k: cache.manifest[k] for k in ("model_sha256", "data_sha256", "k", "layers")},
    }
    if with_base:
        untrained = TopStack(base, cache, settings, encoder, memo)
        base_scores = score_prompts(untrained, cache.complete())
        base_values = [base_scores[i].score for i in index]
        write_report(out, f"{name}.untrained", examples, base_values, {"model": "untrained"})
        extra["against_untrained"] = paired_auroc_ci(examples, scores, base_values)
    report = write_report(out, name, examples, scores, extra)
    log(f"{name}: {time.monotonic() - start:.0f} s -> {out}")
    return report


def greedy_results(folder: Path) -> dict[str, dict[str, Any]]:
    """The finished greedy results of a ``bench --methods greedy`` run, by question id."""
    from sgl_adaptive.data import read_jsonl

    if not (folder / "results.jsonl").is_file():
        raise UserError(f"{folder} holds no bench results (results.jsonl)")
    return {
        r["qid"]: r
        for r in read_jsonl(folder / "results.jsonl")
        if r.get("kind") == "result" and r.get("method") == "greedy"
    }


def greedy_comparison(base_dir: Path, trained_dir: Path) -> dict[str, Any]:
    """Greedy answers of two ``bench --methods greedy`` runs on the same questions: accuracy of each and
    how often their final answers agree (over the questions both runs finished)."""
    base, trained = greedy_results(base_dir), greedy_results(trained_dir)
    common = sorted(set(base) & set(trained))
    if not common:
        raise UserError(f"{base_dir} and {trained_dir} share no finished greedy question")
    return {
        "questions": len(common),
        "base_accuracy": float(np.mean([bool(base[q]["correct"]) for q in common])),
        "accuracy": float(np.mean([bool(trained[q]["correct"]) for q in common])),
        "agreement": float(np.mean([base[q]["answer"] == trained[q]["answer"] for q in common])),
        "same_response": float(np.mean([base[q]["response"] == trained[q]["response"] for q in common])),
    }


def dev_drift_examples(greedy_dir: Path, data_root: str | None = None) -> list[dict[str, Any]]:
    """The base model's greedy GSM8K dev responses (a ``bench --dataset gsm8k-dev --methods greedy`` run)
    as drift examples: on-policy for the base, on questions that no training run sees."""
    from sgl_adaptive.bench.datasets import load_dataset_items

    items = {it.qid: it for it in load_dataset_items("gsm8k-dev", data_root=data_root).items}
    runs = greedy_results(greedy_dir)
    missing = sorted(set(runs) - set(items))
    if missing:
        raise UserError(f"{greedy_dir} has questions outside the GSM8K dev split (e.g. {missing[0]})")
    return [
        {
            "prompt_id": qid,
            "sample": 0,
            "truncated_tokens": None,
            "prompt": items[qid].prompt,
            "response": r["response"],
        }
        for qid, r in sorted(runs.items(), key=lambda kv: kv[1]["index"])
    ]


def drift_report(
    base_path: str,
    model_path: str,
    examples: Sequence[dict[str, Any]],
    where: str,
    limit: int = 32,
    dtype: Any = None,
) -> dict[str, Any]:
    """``evaluate.drift`` (KL(base ‖ model) per response token, greedy next-token agreement) on the first
    ``limit`` full responses of ``examples``."""
    from sgl_adaptive.finetune.evaluate import drift
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm

    base, tokenizer = load_causal_lm(base_path, device="cpu", dtype=dtype)
    model, _ = load_causal_lm(model_path, device="cpu", dtype=dtype)
    return {**drift(base, model, SelfEvalEncoder(tokenizer), examples, limit=limit), "where": where}


def read_times(path: Path) -> list[tuple[str, float, int | None]]:
    """``times.tsv`` (stage, wall seconds, peak RSS MiB or empty when not recorded) as
    ``scripts/selfeval_cpu.sh`` writes it."""
    rows = []
    for line in path.read_text().splitlines():
        name, wall, rss = line.split("\t")
        rows.append((name, float(wall), int(rss) if rss.strip() else None))
    return rows


def write_card(
    adapter: Path,
    report_path: Path,
    *,
    merged: str,
    base_path: str,
    greedy_base: Path | None = None,
    greedy_trained: Path | None = None,
    greedy_control: Path | None = None,
    times: Path | None = None,
    commands: Sequence[str] = (),
    data_root: str | None = None,
    dtype: Any = None,
    log: Callable[[str], None] = print,
) -> tuple[bool, str]:
    """The adapter's model card (``README.md``) and its figures (``card.json``): the cross-validation
    report of its setting (``NAME.json``, with ``NAME.untrained.json`` beside it), drift on the base's
    greedy dev responses, greedy accuracy before and after (and the base against a second run of itself,
    ``greedy_control``), the stage times, and the default-model
    decision (``card.becomes_default``), which is returned."""
    from sgl_adaptive.finetune.card import becomes_default, model_card

    training = json.loads((adapter / "training.json").read_text())
    trained = json.loads(report_path.read_text())
    untrained_path = report_path.with_name(report_path.name.removesuffix(".json") + ".untrained.json")
    untrained = json.loads(untrained_path.read_text())
    if trained["settings"] != training["settings"]:
        raise UserError(f"{report_path} cross-validated other settings than the adapter in {adapter}")
    drift = greedy = None
    if greedy_base is not None:
        log("drift on the base model's greedy GSM8K dev responses …")
        examples = dev_drift_examples(greedy_base, data_root)
        drift = drift_report(
            base_path, merged, examples, f"{greedy_base} (base greedy, GSM8K dev)", dtype=dtype
        )
    if greedy_base is not None and greedy_trained is not None:
        greedy = greedy_comparison(greedy_base, greedy_trained)
        if greedy_control is not None:  # the base against itself: batched bf16 decoding is not deterministic
            control = greedy_comparison(greedy_base, greedy_control)
            greedy["control"] = {k: control[k] for k in ("questions", "agreement", "same_response")}
    decision = becomes_default(trained, greedy["agreement"] if greedy else None, untrained)
    text = model_card(
        training=training,
        trained=trained,
        untrained=untrained,
        decision=decision,
        drift=drift,
        greedy=greedy,
        times=read_times(times) if times else [],
        commands=list(commands),
    )
    (adapter / "README.md").write_text(text)
    figures = {
        "decision": {"default": decision[0], "why": decision[1]},
        "drift": drift,
        "greedy": greedy,
        "report": str(report_path),
        "summary": trained["report"]["summary"],
    }
    (adapter / "card.json").write_text(json.dumps(_json_safe(figures), indent=1) + "\n")
    return decision
