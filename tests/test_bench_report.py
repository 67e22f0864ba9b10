"""Reports from saved lines: grouping, the paper's metric over shared questions, Markdown and plots."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from sgl_adaptive.bench.report import summarize, write_report
from sgl_adaptive.errors import UserError

FAMILY = {"model": "m", "dataset": "d", "split": "dev", "task": "gsm8k", "mode": "live", "max_new_tokens": 64}


def line(qid, method, config, quality, samples=1, flops=1e9):
    return {
        "key": f"{qid}:{method}:{json.dumps(config, sort_keys=True)}",
        "kind": "result",
        **FAMILY,
        "pool": None,
        "qid": qid,
        "method": method,
        "label": " ".join(f"{k}={v}" for k, v in config.items() if k != "max_new_tokens"),
        "config": config,
        "top_n": config.get("n", 1),
        "quality": quality,
        "costs": {
            "samples": samples,
            "batches": 1,
            "generated_tokens": 10 * samples,
            "self_evals": 0,
            "flops": flops,
            "wall_s": 0.5,
            "critical_path_tokens": 10,
        },
    }


def lines():
    bon = {"n": 4, "max_new_tokens": 64}
    out = []
    for q, (g, b, a, p) in enumerate([(0, 1, 1, 0), (0, 1, 0, 1), (1, 1, 1, 1), (0, 0, 0, 0)]):
        out.append(line(f"q{q}", "greedy", {"max_new_tokens": 64}, g))
        out.append(line(f"q{q}", "best-of-n", bon, b, samples=4, flops=4e9))
        out.append(line(f"q{q}", "adaptive", {**bon, "threshold": 0.9}, a, samples=2))
        out.append(line(f"q{q}", "prune", {**bon, "prune_at": 16, "keep": 1}, p, samples=4))
        out.append(line(f"q{q}", "majority", bon, b, samples=4))
    return out


def test_rows_and_percent_of_maximum_improvement():
    (section,) = summarize(lines())
    rows = {r.method: r for r in section.rows}
    assert [r.method for r in section.rows] == ["greedy", "best-of-n", "majority", "adaptive", "prune"]
    assert rows["greedy"].accuracy == 0.25 and rows["best-of-n"].accuracy == 0.75
    # (0.75 - 0.25) / (0.75 - 0.25) and (0.5 - 0.25) / (0.75 - 0.25)
    assert rows["best-of-n"].pct == pytest.approx(100.0)
    assert rows["adaptive"].pct == pytest.approx(50.0)
    assert rows["prune"].pct == pytest.approx(50.0)
    # majority vote (and the stop rules that vote) measure against majority vote over the same N
    assert rows["majority"].pct == pytest.approx(100.0) and rows["greedy"].pct is None
    assert rows["adaptive"].mean("samples") == 2.0 and rows["best-of-n"].mean("flops") == 4e9


def test_percent_uses_only_the_questions_all_three_rows_share():
    data = [x for x in lines() if not (x["method"] == "adaptive" and x["qid"] in ("q2", "q3"))]
    (section,) = summarize(data)
    adaptive = next(r for r in section.rows if r.method == "adaptive")
    # on q0, q1: greedy 0, best-of-n 1, adaptive 0.5
    assert adaptive.questions == 2 and adaptive.pct == pytest.approx(50.0)


def test_report_writes_markdown_and_plots(tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines()))
    (tmp_path / "pruning-live.png").write_bytes(b"stale")  # an earlier layout's plot
    (tmp_path / "notes.png").write_bytes(b"mine")  # not ours: left alone
    console = Console(record=True, width=200)
    write_report(tmp_path, console)
    assert not (tmp_path / "pruning-live.png").exists() and (tmp_path / "notes.png").exists()
    md = (tmp_path / "summary.md").read_text()
    assert "| adaptive | n=4 threshold=0.9 | 4 | 50.0% | 50 |" in md
    for name in ("accuracy_vs_samples", "accuracy_vs_flops", "pruning"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in (tmp_path / f"{name}.svg").read_bytes()[:1000]
        assert f"![{name}.png]({name}.png)" in md and f"{name}.svg)" not in md
    assert "best-of-n" in console.export_text()


def test_report_of_an_empty_folder_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no results"):
        write_report(tmp_path)


def test_budget_matched_and_random_prune_have_rows_percent_and_pruning_curves(tmp_path):
    from sgl_adaptive.bench.report import pruning_series

    prune_cfg = {"n": 4, "max_new_tokens": 64, "prune_at": 16, "keep": 1}
    data = lines()
    for q, (r, m) in enumerate([(0, 1), (1, 0), (1, 1), (0, 0)]):
        data.append(line(f"q{q}", "random-prune", {**prune_cfg, "prune_by": "random"}, r, samples=4))
        data.append(line(f"q{q}", "budget-matched", prune_cfg, m, samples=2))
    (section,) = summarize(data)
    rows = {r.method: r for r in section.rows}
    assert [r.method for r in section.rows][-3:] == ["prune", "random-prune", "budget-matched"]
    # against best-of-n over the same N: (0.5 - 0.25) / (0.75 - 0.25)
    assert rows["budget-matched"].pct == pytest.approx(50.0)
    assert rows["random-prune"].pct == pytest.approx(50.0)
    curves = pruning_series(section.rows)
    assert list(curves) == [("prune", 16), ("random-prune", 16), ("budget-matched", 16)]
    assert curves["budget-matched", 16] == [(20.0, 50.0, "k=1")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in data))
    write_report(tmp_path, Console(record=True, width=200))
    md = (tmp_path / "summary.md").read_text()
    assert "| budget-matched | n=4 prune_at=16 keep=1 | 4 | 50.0% | 50 | 2.00 |" in md
    assert "budget-matched: best-of-m by the final score" in md
    assert (tmp_path / "pruning.png").read_bytes()[:4] == b"\x89PNG"


def with_votes():
    """``lines`` plus weighted-majority and Best-of-N at a second n, and adaptive at a second threshold."""
    out = lines()
    for q, (w, b2, a) in enumerate([(1, 0, 1), (1, 1, 0), (1, 1, 1), (0, 0, 1)]):
        cfg = {"n": 4, "max_new_tokens": 64, "selector": "weighted-majority"}
        out.append(line(f"q{q}", "weighted-majority", cfg, w, samples=4, flops=4e9))
        out.append(line(f"q{q}", "best-of-n", {"n": 2, "max_new_tokens": 64}, b2, samples=2, flops=2e9))
        out.append(
            line(f"q{q}", "adaptive", {"n": 4, "max_new_tokens": 64, "threshold": 0.5}, a, samples=1 + q % 2)
        )
    return out


def plotted(plot):
    (panel,) = plot.panels
    return {c.label: c for c in panel.curves}


def test_the_plotted_points_are_the_tables_numbers():
    from sgl_adaptive.bench.report import row_cells, section_plots

    (section,) = summarize(with_votes())
    plots = section_plots(section)
    assert list(plots) == ["accuracy_vs_samples", "accuracy_vs_flops", "pruning"]
    curves = plotted(plots["accuracy_vs_samples"])
    assert list(curves) == ["greedy", "best-of-n", "majority", "weighted-majority", "adaptive"]
    drawn = 0
    for row in section.rows:
        if row.method not in curves:
            continue
        cells = row_cells(row, section.metric)  # the table's accuracy and avg samples cells
        curve = curves[row.method]
        i = curve.x.index(row.mean("samples"))
        assert (f"{curve.y[i]:.1f}%", f"{curve.x[i]:.2f}") == (cells[3], cells[5])
        assert curve.low[i] <= curve.y[i] <= curve.high[i]
        drawn += 1
    assert drawn == sum(len(c.x) for c in curves.values()) == 7
    assert curves["adaptive"].tags == ["t=0.5", "t=0.9"] and curves["adaptive"].x == [1.5, 2.0]
    assert curves["best-of-n"].x == [2.0, 4.0] and curves["best-of-n"].y == [50.0, 75.0]
    # every row's bootstrap interval over its 4 questions: 0/1 qualities, so the bounds are quarters
    assert {v % 25 for c in curves.values() for v in [*c.low, *c.high]} == {0.0}
    flops = plotted(plots["accuracy_vs_flops"])
    assert flops["best-of-n"].x == [2e9, 4e9] and flops["best-of-n"].y == curves["best-of-n"].y
    pruning = plotted(plots["pruning"])
    assert pruning["prune at 16"].x == [40.0] and pruning["prune at 16"].y == [50.0]
    assert pruning["best-of-n"].tags == ["n=2", "n=4"] and pruning["best-of-n"].x == [20.0, 40.0]


def test_rows_that_differ_in_another_key_are_separate_curves():
    from sgl_adaptive.bench.report import section_plots

    data = lines() + [
        line(f"q{q}", "adaptive", {"n": 8, "max_new_tokens": 64, "threshold": 0.9}, 1, samples=3)
        for q in range(4)
    ]
    (section,) = summarize(data)
    curves = plotted(section_plots(section)["accuracy_vs_samples"])
    assert curves["adaptive n=4"].x == [2.0] and curves["adaptive n=8"].y == [100.0]


def test_a_folder_without_plotted_methods_writes_its_table_and_no_picture(tmp_path):
    data = [line(f"q{q}", "rm-best-of-n", {"n": 4, "max_new_tokens": 64}, q % 2, flops=0) for q in range(4)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in data))
    (tmp_path / "accuracy_vs_samples.svg").write_text("<svg/>")  # an earlier report's picture
    console = Console(record=True, width=200)
    write_report(tmp_path, console)
    assert "| rm-best-of-n |" in (tmp_path / "summary.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "summary.md"]
    assert "wrote summary.md in" in console.export_text()


def test_no_flops_no_flops_plot():
    from sgl_adaptive.bench.report import section_plots

    (section,) = summarize([{**x, "costs": {**x["costs"], "flops": 0}} for x in lines()])
    assert "accuracy_vs_flops" not in section_plots(section)
    assert "accuracy_vs_samples" in section_plots(section)
