"""``sgl-adaptive bench figures``: pictures of out-of-fold self-evaluation scores on a pool of samples with
verifier rewards (e.g. ``bench/results/selfeval-cpu``, scored by ``finetune top --cv`` or the untrained
model).

Inputs: the ``samples.jsonl(.gz)`` that ``finetune data`` writes (prompts, 8 samples each, rewards) and one
or more ``*.scores.jsonl(.gz)`` files (``finetune.experiments.write_report``: one score per prompt_id x
sample x truncated_tokens). The full responses are relabelled as ``finetune data`` labels them
(``labels.pairwise_labels`` at the manifest's tie margin, ``examples.make_examples``) and every number
comes from the selection code of ``finetune.evaluate`` and ``finetune.oof``:

- ``selection``: accuracy against the number of samples n = 1..N: Best-of-n by the score
  (``evaluate.pool_rewards`` on each pool's first n samples), the score-weighted vote (``oof.weighted_pick``,
  its weighting chosen per outer fold on the other folds' prompts by ``oof.oof_weighted_vote``, as
  ``oof_report`` does), majority vote, first sample and oracle; 95% bootstrap intervals over prompts
  (``evaluate.mean_ci``). At n = N these are the ``.json`` report's ``best_of_n`` and ``weighted_vote``.
- ``calibration``: a reliability diagram of the score on full responses against the hard label (no other
  sample is better) and against the pairwise target P(win or tie) (``soft_no``): equal-count bins,
  their mean score against the observed mean, 95% bootstrap intervals over prompts, the expected
  calibration error (ECE) in the legend, and the scores' histogram under each.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.evaluate import by_prompt, mean_ci, pool_rewards, sample_pools
from sgl_adaptive.finetune.examples import make_examples
from sgl_adaptive.finetune.folds import unique_in_order
from sgl_adaptive.finetune.labels import KEEP_LABEL, default_tie_margin, pairwise_labels
from sgl_adaptive.finetune.metrics import bootstrap_ci
from sgl_adaptive.finetune.oof import as_scores, oof_weighted_vote, weighted_pick

from .plotting import Curve, Panel, Plot, draw

SCORES_SUFFIXES = (".scores.jsonl.gz", ".scores.jsonl")
CHOICES = ("best_of_n", "weighted_vote", "majority", "first_sample", "oracle")
"""The selection figure's choices; the last three do not read the score (one curve for all settings)."""
SHARED_STYLE = {
    "majority": ("majority vote", "tab:olive", "D", "-"),
    "first_sample": ("first sample", "black", "", "--"),
    "oracle": ("oracle (any correct)", "tab:gray", "x", ":"),
}
SETTING_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple")


@dataclass
class Setting:
    """One scorer's out-of-fold scores of the full responses, aligned with the examples."""

    name: str
    scores: list[float]


def _open_text(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        yield from handle


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    out = []
    for number, line in enumerate(_open_text(path), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
    return out


def tie_margin_of(samples: Path, records: Sequence[dict[str, Any]]) -> float:
    """The tie margin the data was labelled with (``manifest.json`` beside the samples), else the default
    of ``finetune data`` (verifier when every reward is 0 or 1)."""
    manifest = samples.parent / "manifest.json"
    if manifest.is_file():
        margin = json.loads(manifest.read_text()).get("labels", {}).get("tie_margin")
        if margin is not None:
            return float(margin)
    rewards = [float(s["reward"]) for r in records for s in r["samples"]]
    return default_tie_margin(rewards, verifier=set(rewards) <= {0.0, 1.0})


def full_examples(samples: Path) -> list[dict[str, Any]]:
    """The examples of the full responses, labelled as ``finetune data`` labels them."""
    records = _jsonl(samples)
    if not records:
        raise UserError(f"no samples in {samples}")
    margin = tie_margin_of(samples, records)
    out = []
    for record in records:
        labels = pairwise_labels([float(s["reward"]) for s in record["samples"]], margin)
        out += make_examples(record, labels, (), None, {})
    return out


def setting_name(path: Path) -> str:
    name = path.name
    return next((name[: -len(s)] for s in SCORES_SUFFIXES if name.endswith(s)), path.stem)


def load_setting(path: Path, examples: Sequence[dict[str, Any]]) -> Setting:
    """A scores file's full-response scores in the order of ``examples``; a missing one is an error."""
    by_key = {
        (s["prompt_id"], int(s["sample"])): float(s["score"])
        for s in _jsonl(path)
        if s.get("truncated_tokens") is None
    }
    scores = []
    for ex in examples:
        key = (ex["prompt_id"], int(ex["sample"]))
        if key not in by_key:
            raise UserError(f"{path} has no score of the full response {key[0]} sample {key[1]}")
        scores.append(by_key[key])
    return Setting(setting_name(path), scores)


# ---- the numbers -------------------------------------------------------------------------------------


def selection_curves(
    examples: Sequence[dict[str, Any]], scores: Sequence[float], *, folds: int = 5, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """Per choice of ``CHOICES``: n = 1..N and the mean reward over prompts of the choice among each
    pool's first n samples, with its 95% bootstrap interval over prompts ("n", "mean", "low", "high").
    The vote's weighting of each prompt is chosen on the other folds' full pools (``oof_weighted_vote``)
    and kept for every n."""
    pools = sample_pools(examples, as_scores(scores, len(examples)))
    ids = unique_in_order([ex["prompt_id"] for ex in examples if ex["truncated_tokens"] is None])
    if not pools:
        raise UserError("no full samples to select from")
    of_prompt, _ = oof_weighted_vote(examples, scores, folds=folds, seed=seed)
    out: dict[str, dict[str, list[float]]] = {
        c: {"n": [], "mean": [], "low": [], "high": []} for c in CHOICES
    }
    for n in range(1, max(len(p) for p in pools) + 1):
        first_n = [p[:n] for p in pools]
        rewards = pool_rewards(first_n)
        per_prompt = {
            "best_of_n": rewards["selected"],
            "weighted_vote": np.array(
                [weighted_pick(p, of_prompt[i]).reward for p, i in zip(first_n, ids, strict=True)]
            ),
            "majority": rewards["majority"],
            "first_sample": rewards["first_sample"],
            "oracle": rewards["oracle"],
        }
        for choice, values in per_prompt.items():
            low, high = mean_ci(values)
            for key, v in (("n", n), ("mean", float(values.mean())), ("low", low), ("high", high)):
                out[choice][key].append(float(v))
    return out


def reliability(
    examples: Sequence[dict[str, Any]], scores: Sequence[float], target: str, bins: int = 10
) -> dict[str, Any]:
    """A reliability diagram of ``scores`` against ``target`` ("hard": label "No" as 1, "soft": P(win or
    tie)) in ``bins`` equal-count bins of the score: per bin the mean score, the observed mean and its 95%
    bootstrap interval over prompts, the count; and ECE = sum over bins of count/total x |observed -
    mean score|."""
    s = np.asarray(scores, dtype=float)
    if target == "hard":
        y = np.array([float(ex["label"] == KEEP_LABEL) for ex in examples])
    elif target == "soft":
        y = np.array([float(ex["soft_no"]) for ex in examples])
    else:
        raise ValueError(f"target must be hard or soft (got {target!r})")
    order = np.argsort(s, kind="stable")
    bin_of = np.empty(len(s), dtype=int)
    bin_of[order] = np.arange(len(s)) * bins // max(1, len(s))
    groups = by_prompt(examples)
    # per prompt x bin: count, sum of targets (a bootstrap draw of prompts sums its rows)
    counts = np.zeros((len(groups), bins))
    sums = np.zeros((len(groups), bins))
    for g, idx in enumerate(groups):
        np.add.at(counts[g], bin_of[idx], 1.0)
        np.add.at(sums[g], bin_of[idx], y[idx])
    out: dict[str, Any] = {"score": [], "observed": [], "low": [], "high": [], "count": []}
    for b in range(bins):
        inside = bin_of == b
        if not inside.any():
            continue

        def observed(draw: np.ndarray, b: int = b) -> float:
            n = counts[draw, b].sum()
            return float(sums[draw, b].sum() / n) if n else math.nan

        low, high = bootstrap_ci(len(groups), observed)
        out["score"].append(float(s[inside].mean()))
        out["observed"].append(float(y[inside].mean()))
        out["low"].append(low)
        out["high"].append(high)
        out["count"].append(int(inside.sum()))
    total = sum(out["count"])
    out["ece"] = float(
        sum(
            c / total * abs(o - m)
            for c, o, m in zip(out["count"], out["observed"], out["score"], strict=True)
        )
    )
    out["target_mean"] = float(y.mean())
    return out


def tied_top_scores(examples: Sequence[dict[str, Any]], scores: Sequence[float]) -> int:
    """How many prompts' pools have two samples sharing the top score (argmax breaks the tie by order)."""
    top: dict[str, list[float]] = {}
    for ex, s in zip(examples, scores, strict=True):
        top.setdefault(ex["prompt_id"], []).append(s)
    return sum(1 for v in top.values() if v.count(max(v)) > 1)


# ---- the pictures ------------------------------------------------------------------------------------


def selection_plot(curves: dict[str, dict[str, dict[str, list[float]]]], title: str) -> Plot:
    """Accuracy against n: each setting's Best-of-n and weighted vote, and the score-free choices once."""
    lines = []
    for i, (name, c) in enumerate(curves.items()):
        color = SETTING_COLORS[i % len(SETTING_COLORS)]
        for choice, label, marker, style in (
            ("best_of_n", "Best-of-n", "o", "-"),
            ("weighted_vote", "weighted vote", "v", "--"),
        ):
            lines.append(
                _curve(f"{label}, {name}", c[choice], color, marker, style, band=choice == "best_of_n")
            )
    first = next(iter(curves.values()))
    for choice, (label, color, marker, style) in SHARED_STYLE.items():
        lines.append(_curve(label, first[choice], color, marker, style, band=choice == "majority"))
    panel = Panel(
        "samples per prompt n (the first n of each pool of 8)",
        "accuracy (% of prompts, verifier)",
        lines,
        legend="below",
        legend_columns=2,
    )
    return Plot(title, [panel], height_in=5.6)


def _curve(label: str, c: dict[str, list[float]], color: str, marker: str, style: str, band: bool) -> Curve:
    return Curve(
        label=label,
        x=list(c["n"]),
        y=[100 * v for v in c["mean"]],
        low=[100 * v for v in c["low"]] if band else None,
        high=[100 * v for v in c["high"]] if band else None,
        color=color,
        marker=marker,
        linestyle=style,
        band=band,
    )


def calibration_plot(
    diagrams: dict[str, dict[str, dict[str, Any]]],
    histograms: dict[str, list[float]],
    edges: list[float],
    title: str,
) -> Plot:
    """Two reliability panels (hard label, P(win or tie)) over the histograms of the scores."""
    panels = []
    for target, ylabel in (
        ("hard", "observed fraction kept (no sample better)"),
        ("soft", "observed mean P(win or tie)"),
    ):
        curves = [
            Curve(
                label=f"{name} (ECE {d[target]['ece']:.3f})",
                x=d[target]["score"],
                y=d[target]["observed"],
                low=d[target]["low"],
                high=d[target]["high"],
                color=SETTING_COLORS[i % len(SETTING_COLORS)],
            )
            for i, (name, d) in enumerate(diagrams.items())
        ]
        panels.append(
            Panel(
                "self-evaluation score P(No)",
                ylabel,
                curves,
                title="against the hard label" if target == "hard" else "against P(win or tie)",
                xlim=(0, 1),
                ylim=(0, 1),
                diagonal=True,
                legend="inside",
            )
        )
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
    hist = [
        Curve(
            label=name,
            x=centres,
            y=counts,
            color=SETTING_COLORS[i % len(SETTING_COLORS)],
            marker="",
            drawstyle="steps-mid",
        )
        for i, (name, counts) in enumerate(histograms.items())
    ]
    for _ in range(2):
        panels.append(Panel("self-evaluation score P(No)", "responses", hist, xlim=(0, 1), legend="none"))
    return Plot(title, panels, columns=2, height_in=5.6, height_ratios=[3, 1])


def write_figures(
    samples: Path,
    score_files: Sequence[Path],
    out: Path,
    *,
    labels: Sequence[str] = (),
    selection: Sequence[str] = (),
    bins: int = 10,
) -> dict[str, Any]:
    """Compute both figures' numbers for each scores file, draw them into ``out`` (``selection`` and
    ``calibration`` as PNG and SVG) and write the numbers as ``figures.json``; return them. ``labels``
    name the settings in the legends (default: the files' NAME); ``selection`` names the settings the
    selection figure draws (default: all; figures.json has every setting's numbers)."""
    if not score_files:
        raise UserError("give at least one --scores file")
    if labels and len(labels) != len(score_files):
        raise UserError(f"{len(labels)} --label for {len(score_files)} --scores files: give one each or none")
    examples = full_examples(samples)
    settings = [load_setting(Path(p), examples) for p in score_files]
    for setting, label in zip(settings, labels, strict=False):
        setting.name = label
    if len({s.name for s in settings}) != len(settings):
        raise UserError("two --scores files have the same name")
    label_of = {setting_name(Path(p)): s.name for s, p in zip(settings, score_files, strict=True)}
    label_of.update({s.name: s.name for s in settings})
    unknown = [name for name in selection if name not in label_of]
    if unknown:
        known = ", ".join(s.name for s in settings)
        raise UserError(f"--selection {unknown[0]!r} names no --scores setting ({known})")
    drawn = {label_of[name] for name in selection}
    prompts = len({ex["prompt_id"] for ex in examples})
    data: dict[str, Any] = {
        "samples": str(samples),
        "scores": [str(p) for p in score_files],
        "prompts": prompts,
        "full_responses": len(examples),
        "selection": {s.name: selection_curves(examples, s.scores) for s in settings},
        "calibration": {
            s.name: {t: reliability(examples, s.scores, t, bins) for t in ("hard", "soft")} for s in settings
        },
    }
    edges = list(np.linspace(0, 1, 41))
    data["histogram"] = {
        "edges": [float(e) for e in edges],
        **{s.name: [int(c) for c in np.histogram(s.scores, bins=edges)[0]] for s in settings},
    }
    where = f"{prompts} prompts x {len(examples) // max(1, prompts)} samples, out-of-fold scores"
    out.mkdir(parents=True, exist_ok=True)
    files = draw(
        selection_plot(
            {k: v for k, v in data["selection"].items() if not drawn or k in drawn},
            f"Selecting among samples by the self-evaluation ({where})\n"
            "95% bootstrap intervals over prompts (bands)",
        ),
        out / "selection",
    )
    hist = {s.name: [float(c) for c in data["histogram"][s.name]] for s in settings}
    files += draw(
        calibration_plot(
            data["calibration"],
            hist,
            data["histogram"]["edges"],
            f"Calibration of the self-evaluation on full responses ({where})\n"
            f"{bins} equal-count bins, 95% bootstrap intervals over prompts",
        ),
        out / "calibration",
    )
    data["tied_top_scores"] = {s.name: tied_top_scores(examples, s.scores) for s in settings}
    data["labels"] = {s.name: setting_name(Path(p)) for s, p in zip(settings, score_files, strict=True)}
    data["against_reports"] = {
        s.name: _check_report(Path(p), data["selection"][s.name])
        for s, p in zip(settings, score_files, strict=True)
    }
    (out / "figures.json").write_text(json.dumps(_rounded(data), indent=1) + "\n")
    data["files"] = [*files, "figures.json"]
    return data


def _check_report(scores: Path, curves: dict[str, dict[str, list[float]]]) -> dict[str, Any] | None:
    """The largest n's Best-of-N and vote beside the ``oof_report`` saved next to the scores (``NAME.json``),
    when there is one: the same code on the same scores gives the same numbers."""
    path = scores.with_name(setting_name(scores) + ".json")
    if not path.is_file():
        return None
    report = json.loads(path.read_text()).get("report", {})
    ours = {
        "best_of_n": curves["best_of_n"]["mean"][-1],
        "weighted_vote": curves["weighted_vote"]["mean"][-1],
    }
    theirs = {
        "best_of_n": (report.get("best_of_n") or {}).get("selected"),
        "weighted_vote": (report.get("weighted_vote") or {}).get("reward"),
    }
    same = all(t is not None and abs(ours[k] - t) < 1e-9 for k, t in theirs.items())
    return {"report": path.name, "figures": ours, "report_values": theirs, "equal": same}


def _difference(check: dict[str, Any]) -> str:
    parts = [
        f"{k} {check['figures'][k]:.4f} vs {v:.4f}"
        for k, v in check["report_values"].items()
        if v is not None and abs(check["figures"][k] - v) >= 1e-9
    ]
    return "; ".join(parts) or "missing in the report"


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 5) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def summary_lines(data: dict[str, Any]) -> list[str]:
    """One line per setting: Best-of-N, vote, majority, first and oracle at the largest n, and the ECEs."""
    lines = []
    for name, c in data["selection"].items():
        at = {k: v["mean"][-1] for k, v in c.items()}
        cal = data["calibration"][name]
        lines.append(
            f"{name}: Best-of-{c['best_of_n']['n'][-1]:.0f} {at['best_of_n']:.3f}, vote {at['weighted_vote']:.3f}, "
            f"majority {at['majority']:.3f}, first {at['first_sample']:.3f}, oracle {at['oracle']:.3f}; "
            f"ECE {cal['hard']['ece']:.3f} (hard label), {cal['soft']['ece']:.3f} (P(win or tie))"
        )
        check = (data.get("against_reports") or {}).get(name)
        if check is not None:
            if check["equal"]:
                lines.append(f"  Best-of-N and vote at the largest n equal {check['report']}'s")
            else:
                ties = data["tied_top_scores"][name]
                why = (
                    f" (tied top scores in {ties} pool(s) of the file; argmax takes the earlier)"
                    if ties
                    else ""
                )
                lines.append(f"  differs from {check['report']}: {_difference(check)}{why}")
    return lines
