"""Summaries of a bench folder: one table per (model, dataset, mode, token limit, pool), printed with
rich and written as Markdown, and plots as PNG and SVG (``bench.plotting``): accuracy against samples
and against FLOPs with 95% intervals, and the pruning curves.

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

import numpy as np
from rich.console import Console
from rich.table import Table

from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.metrics import bootstrap_ci

from .methods import METHODS
from .plotting import Curve, Panel, Plot, draw
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
            if name.endswith(".png"):
                out.append(f"![{name}]({name})")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---- plots ----------------------------------------------------------------------------------------------

PLOTTED = ("greedy", "best-of-n", "majority", "weighted-majority", "adaptive", "oracle")
"""The methods of the accuracy plots, in legend order (every method is in the tables; the pruning
methods have their own plot)."""
VARIES = {"adaptive": "threshold"}
"""The configuration key a method's curve runs along (default ``n``); rows that differ in another key
are separate curves."""
STYLE = {
    "greedy": ("black", "*"),
    "best-of-n": ("tab:blue", "o"),
    "majority": ("tab:olive", "D"),
    "weighted-majority": ("tab:purple", "v"),
    "adaptive": ("tab:green", "s"),
    "oracle": ("tab:gray", "x"),
}
PRUNING_LINES = {
    "prune": ("P", "-", "prune at {b}"),
    "random-prune": ("v", ":", "random-prune at {b}"),
    "budget-matched": ("d", "--", "budget-matched to prune at {b}"),
    "adaptive-prune": ("X", "-.", "adaptive-prune at {b}"),
}
"""Pruning plot: each method's marker, line style and legend; the colour is the pruning budget."""
PLOT_PREFIXES = ("accuracy_vs_samples", "accuracy_vs_flops", "pruning")
"""The names of the plots ``section_plots`` makes (before the section suffix)."""


def interval(row: Row) -> tuple[float, float]:
    """95% bootstrap interval (resampling questions) of the row's mean quality, x100 as plotted."""
    values = np.array(list(row.quality.values()), dtype=float)
    low, high = bootstrap_ci(len(values), lambda draw: float(values[draw].mean()))
    return 100 * low, 100 * high


def _curve_groups(rows: list[Row], method: str) -> dict[str, list[Row]]:
    """A method's rows, one list per curve: the rows that differ only in the key the curve runs along;
    the legend names the other keys that differ between curves."""
    mine = [r for r in rows if r.method == method]
    vary = VARIES.get(method, "n")

    def fixed(r: Row) -> dict[str, Any]:
        return {k: v for k, v in r.config.items() if k != vary}

    keys = sorted({k for r in mine for k in fixed(r)})
    differing = [k for k in keys if len({str(fixed(r).get(k)) for r in mine}) > 1]
    out: dict[str, list[Row]] = defaultdict(list)
    for r in mine:
        out[" ".join([method, *(f"{k}={r.config.get(k)}" for k in differing)])].append(r)
    return out


def _points(rows: list[Row], x: str) -> list[tuple[float, float, Row]]:
    pts = [(row.mean(x), 100 * row.accuracy, row) for row in rows]
    return sorted(((xv, y, r) for xv, y, r in pts if xv is not None and xv > 0), key=lambda p: p[:2])


def _row_curve(
    label: str,
    pts: list[tuple[float, float, Row]],
    ci: dict[int, tuple[float, float]],
    tag: str | None,
    color: str,
    marker: str,
    band: bool = False,
) -> Curve:
    """One method's points (from ``_points``) as a curve, each tagged with its config's ``tag`` value."""
    short = {"threshold": "t", "n": "n"}
    return Curve(
        label=label,
        x=[p[0] for p in pts],
        y=[p[1] for p in pts],
        low=[ci[id(p[2])][0] for p in pts],
        high=[ci[id(p[2])][1] for p in pts],
        tags=[f"{short[tag]}={p[2].config[tag]:g}" for p in pts] if tag else [],
        color=color,
        marker=marker,
        linestyle="-" if len(pts) > 1 else "none",
        band=band,
    )


def _accuracy_plot(section: Section, x: str, ci: dict[int, tuple[float, float]]) -> Plot | None:
    xlabel, xscale = {
        "samples": ("average samples per question (log scale)", "log2"),
        "flops": ("average FLOPs per question (estimated from tokens, log scale)", "log"),
    }[x]
    curves = []
    for method in PLOTTED:
        color, marker = STYLE[method]
        for label, rows in _curve_groups(section.rows, method).items():
            pts = _points(rows, x)
            if not pts:
                continue
            tag = "threshold" if method == "adaptive" else None
            curves.append(
                _row_curve(label, pts, ci, tag, color, marker, band=len(pts) > 1 and method != "adaptive")
            )
    if not curves:
        return None
    panel = Panel(xlabel, _ylabel(section), curves, xscale=xscale, legend="below", legend_columns=3)
    return Plot(_plot_title(section), [panel], height_in=5.0)


def _ylabel(section: Section) -> str:
    return "accuracy (% of questions)" if section.metric == "accuracy" else "quality (mean x 100)"


def _plot_title(section: Section) -> str:
    """The section's title on two lines (it is longer than a 7 in figure is wide)."""
    first, _, rest = section.title.partition(" · model ")
    return f"{first}\nmodel {rest} · 95% bootstrap intervals over questions" if rest else section.title


def _pruning_plot(section: Section, ci: dict[int, tuple[float, float]]) -> Plot | None:
    groups = _pruning_rows(section.rows)
    if not groups:
        return None
    budgets = sorted({b for _, b in groups}, key=lambda b: b or 0)
    curves = []
    for (method, budget), rows in groups.items():
        marker, linestyle, legend = PRUNING_LINES[method]
        pts = [_pruning_point(r) for r in rows]
        curves.append(
            Curve(
                label=legend.format(b=budget),
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                low=[ci[id(r)][0] for r in rows],
                high=[ci[id(r)][1] for r in rows],
                tags=[p[2] for p in pts],
                color=f"C{budgets.index(budget) % 10}",
                marker=marker,
                linestyle=linestyle,
            )
        )
    for method in ("greedy", "best-of-n"):
        color, marker = STYLE[method]
        for label, rows in _curve_groups(section.rows, method).items():
            pts = _points(rows, "generated_tokens")
            if pts:
                curves.append(
                    _row_curve(label, pts, ci, "n" if method == "best-of-n" else None, color, marker)
                )
    panel = Panel(
        "average generated tokens per question", _ylabel(section), curves, legend="below", legend_columns=2
    )
    return Plot(_plot_title(section), [panel], height_in=5.5)


def section_plots(section: Section) -> dict[str, Plot]:
    """The section's plots as data, by name (``PLOT_PREFIXES``): accuracy against average samples and
    against average FLOPs for ``PLOTTED`` (adaptive's points tagged with their thresholds), and the
    pruning methods' accuracy against generated tokens beside greedy and Best-of-N over n; every
    point with its 95% interval. A plot with nothing to draw is left out."""
    wanted = {*PLOTTED, *PRUNING_LINES}
    ci = {id(row): interval(row) for row in section.rows if row.method in wanted}
    plots = {
        "accuracy_vs_samples": _accuracy_plot(section, "samples", ci),
        "accuracy_vs_flops": _accuracy_plot(section, "flops", ci),
        "pruning": _pruning_plot(section, ci),
    }
    return {name: plot for name, plot in plots.items() if plot is not None}


def plot_section(section: Section, out_dir: Path, suffix: str = "") -> list[str]:
    """Write the section's plots as PNG and SVG; return their file names."""
    return [
        f for name, plot in section_plots(section).items() for f in draw(plot, out_dir / f"{name}{suffix}")
    ]


def _pruning_point(row: Row) -> tuple[float, float, str]:
    c = row.config
    tag = f"t={c.get('threshold'):g}" if row.method == "adaptive-prune" else f"k={c.get('keep')}"
    return (row.mean("generated_tokens") or 0.0, 100 * row.accuracy, tag)


def _pruning_rows(rows: list[Row]) -> dict[tuple[str, Any], list[Row]]:
    """The rows of each (method, pruning budget) of ``PRUNING_LINES``, by their plotted point."""
    out: dict[tuple[str, Any], list[Row]] = defaultdict(list)
    for row in rows:
        if row.method in PRUNING_LINES:
            out[row.method, row.config.get("prune_at")].append(row)
    order = list(PRUNING_LINES)
    return {
        key: sorted(group, key=_pruning_point)
        for key, group in sorted(out.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1] or 0))
    }


def pruning_series(rows: list[Row]) -> dict[tuple[str, Any], list[tuple[float, float, str]]]:
    """The pruning plot's curves: per (method, pruning budget) of ``PRUNING_LINES``, its rows as (average
    generated tokens, accuracy %, tag: k=keep, or t=threshold for adaptive-prune), by tokens."""
    return {key: [_pruning_point(r) for r in group] for key, group in _pruning_rows(rows).items()}


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
    drawn = {p for prefix in PLOT_PREFIXES for ext in ("png", "svg") for p in out.glob(f"{prefix}*.{ext}")}
    for stale in drawn - {out / f for f in files}:
        stale.unlink()  # an earlier report's plot of a section layout that changed (e.g. live only → live + sweep)
    console.print(f"wrote {', '.join(files)} in {out}", highlight=False)
    return sections
