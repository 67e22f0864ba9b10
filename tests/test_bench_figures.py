"""``bench figures``: the selection curves and reliability diagram of out-of-fold scores, against the
selection report's own numbers (``oof_report``), the committed figures against the committed reports,
and one-line errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_adaptive.bench.figures import full_examples, reliability, selection_curves, write_figures
from sgl_adaptive.errors import UserError

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "selfeval-cpu"
# 6 prompts x 4 samples: (reward, answer) per sample, and one score per sample
POOLS = [
    ([(0, 3), (1, 5), (1, 5), (0, 4)], [0.9, 0.4, 0.6, 0.2]),
    ([(1, 7), (0, 2), (0, 2), (0, 2)], [0.3, 0.8, 0.1, 0.5]),
    ([(0, 1), (0, 1), (1, 9), (0, 6)], [0.5, 0.5, 0.7, 0.2]),
    ([(1, 4), (1, 4), (1, 4), (1, 4)], [0.6, 0.7, 0.8, 0.9]),
    ([(0, 8), (0, 3), (0, 8), (1, 2)], [0.2, 0.9, 0.3, 0.95]),
    ([(0, 5), (1, 6), (0, 5), (0, 5)], [0.7, 0.6, 0.2, 0.1]),
]


@pytest.fixture()
def data(tmp_path) -> tuple[Path, Path]:
    records, scores = [], []
    for p, (samples, values) in enumerate(POOLS):
        pid = f"p{p}"
        records.append(
            {
                "id": pid,
                "prompt": f"question {p}",
                "seed": p,
                "samples": [
                    {"index": i, "text": f"... The answer is {a}", "tokens": 9, "finished": True, "reward": r}
                    for i, (r, a) in enumerate(samples)
                ],
            }
        )
        for i, v in enumerate(values):
            scores.append({"prompt_id": pid, "sample": i, "truncated_tokens": None, "score": v})
            scores.append({"prompt_id": pid, "sample": i, "truncated_tokens": 4, "score": 0.5})
    with gzip.open(tmp_path / "samples.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (tmp_path / "demo.scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    return tmp_path / "samples.jsonl.gz", tmp_path / "demo.scores.jsonl"


def scores_of(examples):
    return [POOLS[int(ex["prompt_id"][1:])][1][ex["sample"]] for ex in examples]


def test_selection_curves_are_the_reports_numbers(data):
    from sgl_adaptive.finetune.oof import oof_report

    examples = full_examples(data[0])
    assert [ex["label"] for ex in examples[:4]] == ["Yes", "No", "No", "Yes"]
    scores = scores_of(examples)
    curves = selection_curves(examples, scores, folds=3)
    report = oof_report(examples, scores, folds=3, thresholds=())
    bon = report["best_of_n"]
    assert curves["best_of_n"]["n"] == [1, 2, 3, 4]
    for choice, key in (
        ("best_of_n", "selected"),
        ("majority", "majority"),
        ("first_sample", "first_sample"),
    ):
        assert curves[choice]["mean"][-1] == pytest.approx(bon[key])
        assert curves[choice]["mean"][1] == pytest.approx(bon["per_k"]["2"][key])
    assert curves["oracle"]["mean"] == pytest.approx([2 / 6, 4 / 6, 5 / 6, 1.0])
    assert curves["weighted_vote"]["mean"][-1] == pytest.approx(report["weighted_vote"]["reward"])
    # by hand, pool by pool, Best-of-4 picks samples 0, 1, 2, 3, 3, 0: rewards 0, 0, 1, 1, 1, 0
    assert curves["best_of_n"]["mean"][-1] == pytest.approx(3 / 6)
    assert all(
        lo <= m <= hi
        for c in curves.values()
        for m, lo, hi in zip(c["mean"], c["low"], c["high"], strict=True)
    )


def test_reliability_bins_by_hand():
    examples = [
        {"prompt_id": f"p{i // 2}", "label": label, "soft_no": soft}
        for i, (label, soft) in enumerate([("Yes", 0.0), ("No", 1.0), ("No", 1.0), ("No", 0.5)])
    ]
    d = reliability(examples, [0.1, 0.3, 0.6, 0.8], "hard", bins=2)
    assert d["score"] == pytest.approx([0.2, 0.7]) and d["observed"] == [0.5, 1.0] and d["count"] == [2, 2]
    assert d["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.3)
    soft = reliability(examples, [0.1, 0.3, 0.6, 0.8], "soft", bins=2)
    assert soft["observed"] == [0.5, 0.75] and soft["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.05)
    with pytest.raises(ValueError, match="hard or soft"):
        reliability(examples, [0.1] * 4, "both")


def test_write_figures_draws_png_and_svg_and_saves_the_numbers(data, tmp_path):
    samples, scores = data
    out = tmp_path / "figures"
    result = write_figures(samples, [scores], out, bins=3)
    assert result["files"] == [
        "selection.png",
        "selection.svg",
        "calibration.png",
        "calibration.svg",
        "figures.json",
    ]
    for name in ("selection", "calibration"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in (out / f"{name}.svg").read_bytes()[:1000]
    saved = json.loads((out / "figures.json").read_text())
    assert saved["prompts"] == 6 and saved["full_responses"] == 24
    assert saved["selection"]["demo"]["best_of_n"]["mean"][-1] == pytest.approx(0.5)
    assert sum(saved["calibration"]["demo"]["hard"]["count"]) == 24
    assert saved["against_reports"] == {"demo": None}  # no demo.json beside the scores
    assert saved["tied_top_scores"] == {"demo": 0}
    # a setting named by its file's NAME or by its label; the legend uses the label
    again = write_figures(samples, [scores], out, labels=["shown"], selection=["demo"], bins=3)
    assert list(again["selection"]) == ["shown"] and again["labels"] == {"shown": "demo"}


def test_missing_scores_and_bad_options_are_one_line_errors(data, tmp_path):
    from sgl_adaptive.cli import app

    samples, scores = data
    lines = scores.read_text().splitlines()
    short = tmp_path / "short.scores.jsonl"
    short.write_text(
        "\n".join(line for line in lines if '"p5", "sample": 3, "truncated_tokens": null' not in line)
    )
    with pytest.raises(UserError, match="has no score of the full response p5 sample 3"):
        write_figures(samples, [short], tmp_path / "out")
    with pytest.raises(UserError, match="1 --label for 2 --scores"):
        write_figures(samples, [scores, short], tmp_path / "out", labels=["a"])
    runner = CliRunner()
    for args, message in (
        ([], "--samples, --scores and --out are required"),
        (["--samples", str(tmp_path / "none.jsonl"), "--scores", str(scores), "--out", str(tmp_path)], "file not found"),
        (["--samples", str(samples), "--scores", str(scores), "--out", str(tmp_path), "--selection", "x"], "names no --scores"),
    ):  # fmt: skip
        res = runner.invoke(app, ["bench", "figures", *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "selection.png").exists()


def test_the_committed_figures_are_the_committed_reports():
    """figures.json beside the committed scores holds what the selection reports of the same scores say
    at n = 8 (and, per n, the reports' Best-of-K per K)."""
    saved = json.loads((RESULTS / "figures" / "figures.json").read_text())
    assert saved["prompts"] == 342 and saved["full_responses"] == 2736
    for label, name in saved["labels"].items():
        report = json.loads((RESULTS / f"{name}.json").read_text())["report"]
        curves, bon = saved["selection"][label], report["best_of_n"]
        for k, at in bon["per_k"].items():
            assert curves["best_of_n"]["mean"][int(k) - 1] == pytest.approx(at["selected"], abs=0.0031)
            assert curves["majority"]["mean"][int(k) - 1] == pytest.approx(at["majority"], abs=1e-5)
        assert curves["weighted_vote"]["mean"][-1] == pytest.approx(
            report["weighted_vote"]["reward"], abs=1e-5
        )
        check = saved["against_reports"][label]
        # one tie at 6 decimals in one file moves one prompt of 342
        assert check["equal"] or saved["tied_top_scores"][label] > 0
