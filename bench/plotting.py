"""Pictures as data, drawn one way everywhere: a ``Plot`` holds panels of ``Curve``s (points with optional
95% intervals), and ``draw`` writes it as PNG and SVG with matplotlib's Agg backend.

The callers build the data (``bench.report`` from a bench folder, ``bench.figures`` from out-of-fold
scores) and keep it, so a test can compare the plotted points with the tables. The house style: 7 in
wide at 100 dpi (a 700 px PNG, readable at the README's width), axes labelled with their units, the
legend below the axes when it would cover curves, text kept as text in the SVG, no timestamps (the same
data gives the same files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DPI = 100
WIDTH_IN = 7.0


@dataclass
class Curve:
    """One legend entry: points (x, y), optionally with a 95% interval [low, high] per point."""

    label: str
    x: list[float]
    y: list[float]
    low: list[float] | None = None
    high: list[float] | None = None
    tags: list[str] = field(default_factory=list)
    """A short annotation per point (e.g. the threshold), or none."""
    color: str | None = None
    marker: str = "o"
    linestyle: str = "-"
    band: bool = False
    """The interval as a shaded band (curves) rather than error bars (points)."""
    drawstyle: str = "default"

    def __post_init__(self) -> None:
        n = len(self.x)
        if len(self.y) != n or any(v is not None and len(v) != n for v in (self.low, self.high)):
            raise ValueError(f"curve {self.label!r}: x, y and the interval differ in length")
        if self.tags and len(self.tags) != n:
            raise ValueError(f"curve {self.label!r}: one tag per point")


@dataclass
class Panel:
    """One set of axes."""

    xlabel: str
    ylabel: str
    curves: list[Curve]
    title: str = ""
    xscale: Literal["linear", "log", "log2"] = "linear"
    xlim: tuple[float, float] | None = None
    ylim: tuple[float, float] | None = None
    diagonal: bool = False
    """Draw y = x (a reliability diagram's perfect calibration)."""
    legend: Literal["inside", "below", "none"] = "inside"
    legend_columns: int = 2


@dataclass
class Plot:
    """A figure: panels in a grid of ``columns`` columns, row by row."""

    title: str
    panels: list[Panel]
    columns: int = 1
    height_in: float = 4.5
    height_ratios: list[float] | None = None


def draw(plot: Plot, stem: Path) -> list[str]:
    """Write ``stem.png`` and ``stem.svg``; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(plot.panels) / plot.columns)
    style = {"svg.fonttype": "none", "svg.hashsalt": "sgl-adaptive", "font.size": 9}
    with plt.rc_context(style):
        fig, axes = plt.subplots(
            rows,
            plot.columns,
            figsize=(WIDTH_IN, plot.height_in),
            squeeze=False,
            gridspec_kw={"height_ratios": plot.height_ratios} if plot.height_ratios else None,
        )
        for ax, panel in zip(axes.flat, plot.panels, strict=False):
            _draw_panel(ax, panel)
        for ax in list(axes.flat)[len(plot.panels) :]:
            ax.set_visible(False)
        fig.suptitle(plot.title, fontsize=9)
        fig.tight_layout()
        stem.parent.mkdir(parents=True, exist_ok=True)
        names = []
        for ext, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
            path = stem.with_name(f"{stem.name}.{ext}")
            fig.savefig(path, dpi=DPI, metadata=metadata)
            names.append(path.name)
        plt.close(fig)
    return names


def _draw_panel(ax: Any, panel: Panel) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    if panel.diagonal:
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="perfect calibration")
    for curve in panel.curves:
        line = ax.plot(
            curve.x,
            curve.y,
            marker=curve.marker,
            markersize=4,
            linestyle=curve.linestyle,
            color=curve.color,
            drawstyle=curve.drawstyle,
            label=curve.label,
        )[0]
        color = line.get_color()
        if curve.low is not None and curve.high is not None:
            if curve.band:
                ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.15, linewidth=0)
            else:
                err = [
                    [y - lo for y, lo in zip(curve.y, curve.low, strict=True)],
                    [hi - y for y, hi in zip(curve.y, curve.high, strict=True)],
                ]
                ax.errorbar(
                    curve.x, curve.y, yerr=err, fmt="none", ecolor=color, capsize=2, linewidth=0.8, alpha=0.6
                )
        for x, y, tag in zip(curve.x, curve.y, curve.tags, strict=False):
            ax.annotate(tag, (x, y), fontsize=7, color=color, xytext=(3, 3), textcoords="offset points")
    if panel.xscale == "log2":
        ax.set_xscale("log", base=2)
        xs = [x for c in panel.curves for x in c.x if x > 0]
        if xs:
            ticks = [2.0**e for e in range(math.floor(math.log2(min(xs))), math.ceil(math.log2(max(xs))) + 1)]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
    elif panel.xscale == "log":
        ax.set_xscale("log")
    if panel.xlim:
        ax.set_xlim(*panel.xlim)
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.title:
        ax.set_title(panel.title, fontsize=9)
    ax.grid(alpha=0.3)
    if panel.legend == "inside":
        ax.legend(fontsize=8)
    elif panel.legend == "below":
        ax.legend(
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.18),
            ncol=panel.legend_columns,
            frameon=False,
        )
