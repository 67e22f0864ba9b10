"""Summaries of a bench folder: one table per (model, dataset, mode, token limit, pool), printed with
rich and written as Markdown, and PNG plots (accuracy vs samples, accuracy vs FLOPs, pruning curves).

Each row is one method x configuration, averaged over its questions. "% of max" is the paper's
percent of maximum improvement: (row - greedy) / (Best-of-N by the same scorer - greedy), over the
questions the three rows share; it is defined for the methods that select by a scorer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sgl_adaptive.errors import UserError

from .methods import METHODS, PRUNING
from .store import config_hash, read_lines
from .sweep import percent_of_max

RESULTS = "results.jsonl"
SCORER_OF = {
    "best-of-n": "best-of-n",
    "adaptive": "best-of-n",
    "prune": "best-of-n",
    "adaptive-prune": "best-of-n",
    "rm-best-of-n": "rm-best-of-n",
    "judge-best-of-n": "judge-best-of-n",
    "confidence-best-of-n": "confidence-best-of-n",
    "self-certainty-best-of-n": "self-certainty-best-of-n",
    "weighted-majority": "best-of-n",
    "deepconf": "best-of-n",
    "random-prune": "best-of-n",
    "budget-matched": "best-of-n",
    "adaptive-no-anneal": "best-of-n",
    "best-of-n-anneal": "best-of-n",
    "majority": "majority",
    "adaptive-consistency": "majority",
    "esc": "majority",
}
"""The Best-of-N whose gain a method's "% of max" is measured against (the same scorer; the methods
that vote against majority vote over the same N)."""
COST_FIELDS = (
    "samples",
    "batches",
    "generated_tokens",
    "self_evals",
    "critical_path_tokens",
    "flops",
    "wall_s",
)
FAMILY_FIELDS = ("model", "dataset", "split", "task", "mode", "max_new_tokens", "pool")


@dataclass
class Row:
    method: str
    label: str
    config: dict[str, Any]
    top_n: int
    quality: dict[str, float] = field(default_factory=dict)
    """Per question id."""
    costs: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    pct: float | None = None

    @property
    def questions(self) -> int:
        return len(self.quality)

    @property
    def accuracy(self) -> float:
        return sum(self.quality.values()) / len(self.quality)

    def mean(self, name: str) -> float | None:
        values = self.costs.get(name) or []
        return sum(values) / len(values) if values else None


@dataclass
class Section:
    """The rows of one comparable family of lines."""

    family: dict[str, Any]
    rows: list[Row]
    pool_wall_s: float | None = None

    @property
    def title(self) -> str:
        f = self.family
        qs = max((r.questions for r in self.rows), default=0)
        pool = f" · pool {f['pool']}" if f.get("pool") else ""
        return (
            f"{f['dataset']} ({f['split']}, {qs} questions) · model {f['model']} · {f['mode']} · "
            f"max {f['max_new_tokens']} new tokens{pool}"
        )

    @property
    def metric(self) -> str:
        return "quality" if self.family.get("task") == "general" else "accuracy"

    @property
    def slug(self) -> str:
        f = self.family
        raw = f"{f['mode']}-{f['dataset']}-{f['model']}-{f['max_new_tokens']}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


def _sort_key(row: Row) -> tuple[Any, ...]:
    order = METHODS.index(row.method) if row.method in METHODS else len(METHODS)
    c = row.config
    return (order, c.get("n", 0), c.get("threshold", 0.0), c.get("prune_at", 0), c.get("keep", 0), row.label)


def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"no bench folder at {out}")
    lines = [r for r in read_lines(out / RESULTS) if r.get("kind") == "result" and "quality" in r]
    if not lines:
        raise UserError(f"no results in {out / RESULTS}")
    return lines


def summarize(lines: list[dict[str, Any]]) -> list[Section]:
    """Group lines into sections and rows, and compute "% of max" for each row."""
    grouped: dict[tuple[Any, ...], dict[tuple[str, str], Row]] = defaultdict(dict)
    pool_walls: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for line in lines:
        fam = tuple(line.get(k) for k in FAMILY_FIELDS)
        rkey = (line["method"], config_hash(line.get("config", {})))
        row = grouped[fam].get(rkey)
        if row is None:
            row = grouped[fam][rkey] = Row(
                line["method"], line.get("label", ""), line.get("config", {}), line.get("top_n", 1)
            )
        if line["qid"] in row.quality or line.get("quality") is None:
            continue
        row.quality[line["qid"]] = float(line["quality"])
        for name in COST_FIELDS:
            value = (line.get("costs") or {}).get(name)
            if value is not None:
                row.costs[name].append(float(value))
        if line.get("pool_wall_s") is not None:
            pool_walls[fam][line["qid"]] = float(line["pool_wall_s"])
    sections = []
    for fam, rows_by_key in grouped.items():
        rows = sorted(rows_by_key.values(), key=_sort_key)
        for row in rows:
            row.pct = _pct(row, rows)
        walls = pool_walls.get(fam)
        sections.append(
            Section(
                dict(zip(FAMILY_FIELDS, fam, strict=True)),
                rows,
                sum(walls.values()) / len(walls) if walls else None,
            )
        )
    sections.sort(key=lambda s: tuple(str(s.family.get(k)) for k in FAMILY_FIELDS))
    return sections


def _pct(row: Row, rows: list[Row]) -> float | None:
    scorer = SCORER_OF.get(row.method)
    base = next((r for r in rows if r.method == "greedy"), None)
    if scorer is None or base is None:
        return None
    tops = [r for r in rows if r.method == scorer and r.config.get("n") == row.top_n]
    same = [
        r
        for r in tops
        if all(
            r.config.get(k) == row.config.get(k) for k in ("temperature", "top_p", "seed") if k in row.config
        )
    ]
    top = (same or tops or [None])[0]
    if top is None:
        return None
    common = set(row.quality) & set(base.quality) & set(top.quality)
    if not common:
        return None

    def mean(r: Row) -> float:
        return sum(r.quality[q] for q in common) / len(common)

    return percent_of_max(mean(row), mean(base), mean(top))


# ---- tables -------------------------------------------------------------------------------------------

HEADERS = (
    "method",
    "config",
    "questions",
    "{metric}",
    "% of max",
    "avg samples",
    "avg batches",
    "avg gen tokens",
    "avg self-evals",
    "avg FLOPs",
    "avg wall s",
)
SHORT_HEADERS = (
    "method",
    "config",
    "qs",
    "{metric}",
    "% max",
    "samples",
    "batches",
    "gen tok",
    "evals",
    "FLOPs",
    "wall s",
)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def row_cells(row: Row, metric: str) -> list[str]:
    quality = f"{100 * row.accuracy:.1f}%" if metric == "accuracy" else f"{row.accuracy:.3f}"
    return [
        row.method,
        row.label or "—",
        str(row.questions),
        quality,
        _fmt(row.pct, ".0f"),
        _fmt(row.mean("samples"), ".2f"),
        _fmt(row.mean("batches"), ".2f"),
        _fmt(row.mean("generated_tokens"), ".0f"),
        _fmt(row.mean("self_evals"), ".2f"),
        _fmt(row.mean("flops"), ".3g"),
        _fmt(row.mean("wall_s"), ".2f"),
    ]


def _notes(section: Section) -> list[str]:
    notes = []
    if section.family.get("mode") == "sweep":
        wall = (
            f" (drawing it took {section.pool_wall_s:.1f} s wall per question)"
            if section.pool_wall_s is not None
            else ""
        )
        notes.append(
            f"Sweep: every row is computed from one pool of samples per question{wall}; costs are what the "
            "method would spend, FLOPs estimated from token counts; wall time is not measured per row."
        )
    if any(r.method == "budget-matched" for r in section.rows):
        notes.append(
            "budget-matched: best-of-m by the final score over the pool's first m samples, m the most whole "
            "samples that fit in the generated tokens prune spent on that question at the same b and k "
            "(at least one); no score at a pruning point."
        )
    notes.append(
        "% of max = (row − greedy) / (Best-of-N by the same scorer − greedy); — where undefined "
        "(no scorer, or Best-of-N no better than greedy)."
    )
    return notes


def rich_tables(sections: list[Section], console: Console) -> None:
    for section in sections:
        table = Table(
            title=section.title, title_justify="left", header_style="bold", caption="averages per question"
        )
        for i, h in enumerate(SHORT_HEADERS):
            table.add_column(
                h.format(metric=section.metric), justify="left" if i < 2 else "right", no_wrap=i < 2
            )
        for row in section.rows:
            table.add_row(*row_cells(row, section.metric))
        console.print(table)
        for note in _notes(section):
            console.print(note, style="dim", highlight=False)


def markdown(sections: list[Section], plots: dict[str, list[str]] | None = None) -> str:
    out = ["# Bench summary", ""]
    for section in sections:
        headers = [h.format(metric=section.metric) for h in HEADERS]
        out += [f"## {section.title}", "", "| " + " | ".join(headers) + " |"]
        out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|")
        out += ["| " + " | ".join(row_cells(row, section.metric)) + " |" for row in section.rows]
        out += ["", *_notes(section), ""]
        for name in (plots or {}).get(section.slug, []):
            out.append(f"![{name}]({name})")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---- plots ----------------------------------------------------------------------------------------------

STYLE = {
    "greedy": ("black", "*"),
    "best-of-n": ("tab:blue", "o"),
    "rm-best-of-n": ("tab:purple", "v"),
    "judge-best-of-n": ("tab:brown", "^"),
    "majority": ("tab:olive", "D"),
    "oracle": ("tab:gray", "x"),
    "adaptive": ("tab:green", "s"),
    "prune": ("tab:red", "P"),
    "adaptive-prune": ("tab:orange", "X"),
    "random-prune": ("tab:pink", "v"),
    "budget-matched": ("teal", "d"),
}
PRUNING_LINES = {
    "prune": ("P", "-", "prune at {b}"),
    "random-prune": ("v", ":", "random-prune at {b}"),
    "budget-matched": ("d", "--", "budget-matched to prune at {b}"),
    "adaptive-prune": ("X", "-.", "adaptive-prune at {b}"),
}
"""Pruning plot: each method's marker, line style and legend; the colour is the pruning budget."""


def _series(rows: list[Row], x: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        xv = row.mean(x)
        if xv is not None and (x != "flops" or xv > 0):
            out[row.method].append((xv, 100 * row.accuracy))
    return {m: sorted(pts) for m, pts in out.items()}


def plot_section(section: Section, out_dir: Path, suffix: str = "") -> list[str]:
    """Write the section's PNGs; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ylabel = "accuracy (%)" if section.metric == "accuracy" else "quality (x100)"
    for x, xlabel, name, log in (
        ("samples", "average samples per question", "accuracy_vs_samples", False),
        ("flops", "average FLOPs per question", "accuracy_vs_flops", True),
    ):
        series = _series(section.rows, x)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, pts in series.items():
            color, marker = STYLE.get(method, ("tab:cyan", "."))
            xs, ys = zip(*pts, strict=True)
            curve = len(pts) > 1 and method not in PRUNING  # a b x k grid: points, not a curve
            ax.plot(
                xs,
                ys,
                marker=marker,
                color=color,
                label=method,
                linestyle="-" if curve else "none",
                alpha=0.75,
            )
        if log:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel)
        written.append(_save(fig, ax, section.title, out_dir / f"{name}{suffix}.png", legend_size=8))
    curves = pruning_series(section.rows)
    if curves:
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        budgets = sorted({b for _, b in curves}, key=lambda b: b or 0)
        for (method, budget), pts in curves.items():
            marker, linestyle, legend = PRUNING_LINES[method]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=marker,
                linestyle=linestyle,
                color=f"C{budgets.index(budget) % 10}",
                label=legend.format(b=budget),
                alpha=0.85,
            )
            for tokens, acc, tag in pts:
                ax.annotate(tag, (tokens, acc), fontsize=6, xytext=(2, 2), textcoords="offset points")
        for row in section.rows:
            if row.method in ("best-of-n", "greedy") and (
                row.method == "greedy" or row.config.get("n") == row.top_n
            ):
                color, marker = STYLE[row.method]
                ax.plot(
                    [row.mean("generated_tokens") or 0.0],
                    [100 * row.accuracy],
                    marker=marker,
                    color=color,
                    linestyle="none",
                    markersize=10,
                    label=f"{row.method} {row.label}".strip(),
                )
        ax.set(xlabel="average generated tokens per question", ylabel=ylabel)
        written.append(
            _save(
                fig, ax, section.title, out_dir / f"pruning{suffix}.png", legend_size=7, legend_outside=True
            )
        )
    return written


def pruning_series(rows: list[Row]) -> dict[tuple[str, Any], list[tuple[float, float, str]]]:
    """The pruning plot's curves: per (method, pruning budget) of ``PRUNING_LINES``, its rows as (average
    generated tokens, accuracy %, tag: k=keep, or t=threshold for adaptive-prune), by tokens."""
    out: dict[tuple[str, Any], list[tuple[float, float, str]]] = defaultdict(list)
    for row in rows:
        if row.method not in PRUNING_LINES:
            continue
        c = row.config
        tag = f"t={c.get('threshold'):g}" if row.method == "adaptive-prune" else f"k={c.get('keep')}"
        out[row.method, c.get("prune_at")].append(
            (row.mean("generated_tokens") or 0.0, 100 * row.accuracy, tag)
        )
    order = list(PRUNING_LINES)
    return {
        key: sorted(pts)
        for key, pts in sorted(out.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1] or 0))
    }


def _save(fig: Any, ax: Any, title: str, path: Path, legend_size: int, legend_outside: bool = False) -> str:
    """Title, grid and legend in the house style (the legend right of the axes when it would cover many
    curves); write the PNG, close the figure; return its file name."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    if legend_outside:
        ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


PLOT_PREFIXES = ("accuracy_vs_samples", "accuracy_vs_flops", "pruning")
"""The names of the PNGs ``plot_section`` writes (before the section suffix)."""


def write_report(out_dir: str | Path, console: Console | None = None) -> list[Section]:
    """Print the tables, write ``summary.md`` and the PNGs into ``out_dir``; return the sections."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # a file or a pipe: do not squeeze the table to 80 columns
            console = Console(width=160)
    out = Path(out_dir)
    sections = summarize(load_results(out))
    plots: dict[str, list[str]] = {}
    by_mode = len({s.family.get("mode") for s in sections}) == len(sections)
    for section in sections:
        suffix = "" if len(sections) == 1 else f"-{section.family['mode'] if by_mode else section.slug}"
        plots[section.slug] = plot_section(section, out, suffix)
    (out / "summary.md").write_text(markdown(sections, plots), encoding="utf-8")
    rich_tables(sections, console)
    files = ["summary.md", *(f for names in plots.values() for f in names)]
    for stale in {p for prefix in PLOT_PREFIXES for p in out.glob(f"{prefix}*.png")} - {
        out / f for f in files
    }:
        stale.unlink()  # an earlier report's plot of a section layout that changed (e.g. live only → live + sweep)
    console.print(f"wrote {', '.join(files)} in {out}", highlight=False)
    return sections
