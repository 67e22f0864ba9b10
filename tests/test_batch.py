"""``sgl-adaptive batch``: one budget across many prompts (the allocation rule itself is in test_rules.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_adaptive.batch import BatchSettings, load_batch, run_batch, run_batch_file
from sgl_adaptive.config import MethodConfig
from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.prompts import PromptItem

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ITEMS = [PromptItem(f"q{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(5)]
CONFIG = MethodConfig(max_new_tokens=6, temperature=1.0)


def write_prompts(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_load_batch_reads_prompts_questions_and_references(tmp_path):
    path = write_prompts(
        tmp_path / "p.jsonl",
        [
            '{"id": "a", "prompt": "Say hi."}',
            "",
            '{"id": 7, "question": "What is 2 + 2?", "answer": "2 + 2 = 4\\n#### 4"}',
            '{"question": "Name a colour."}',
            '{"id": "r", "prompt": "What is 3 + 3?", "reference": "6"}',
        ],
    )
    items = load_batch(path)
    assert [it.id for it in items][:2] == ["a", "7"] and items[2].id.startswith("p-")
    assert items[1].prompt.startswith("What is 2 + 2?") and items[1].reference == "4"  # the GSM8K prompt
    assert items[2].prompt == "Name a colour." and items[2].reference is None
    assert items[0].reference is None and items[3].reference == "6"


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        (['{"id": "a", "prompt": "x"}', "{not json"], "p.jsonl:2: malformed JSON"),
        (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "the id 'a' appears twice"),
        (['{"id": "a", "label": "x"}'], "record 1: cannot find a prompt"),
        ([], "no prompts in"),
    ],
)
def test_load_batch_errors_name_the_line(tmp_path, lines, needle):
    with pytest.raises(UserError, match=needle):
        load_batch(write_prompts(tmp_path / "p.jsonl", lines))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.jsonl", "--budget", "4"], "file not found"),
        (["BAD", "--budget", "4"], "bad.jsonl:2: malformed JSON"),
        (["GOOD", "--budget", "2"], "--budget 2 samples is less than the 3 prompts"),
        (["GOOD", "--budget", "4", "--allocation", "loudest"], "unknown allocation 'loudest'; choose one of"),
        (["GOOD", "--budget", "4", "--method", "prune"], "unknown batch method 'prune'; choose one of"),
        (["GOOD", "--budget", "4", "--budget-unit", "words"], "unknown budget unit 'words'"),
        (["GOOD", "--budget", "4", "--stop", "never", "--method", "adaptive"], "unknown stop rule 'never'"),
        (["GOOD", "--budget", "4", "--stop", "beta"], "--stop is not used by best-of-n"),
        (["GOOD", "--budget", "4", "--compare-even"], "--compare-even needs prompts with a reference"),
    ],
)
def test_the_batch_command_refuses_bad_input_in_one_line(tmp_path, args, needle):
    good = write_prompts(tmp_path / "good.jsonl", [f'{{"id": "{i}", "prompt": "p{i}"}}' for i in range(3)])
    bad = write_prompts(tmp_path / "bad.jsonl", ['{"id": "a", "prompt": "x"}', "{oops"])
    args = [{"GOOD": str(good), "BAD": str(bad)}.get(a, a) for a in args]
    from sgl_adaptive.cli import app

    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["batch", *args, "--out", str(out)], env={"COLUMNS": "300"})
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert needle in lines[0], res.output
    assert not out.exists()


@pytest.mark.parametrize("allocation", ["score", "agreement", "even"])
def test_run_batch_spends_exactly_the_budget_one_record_per_prompt(backend, allocation):
    settings = BatchSettings(13, "samples", allocation, "best-of-n", 3, CONFIG)
    records = run_batch(ITEMS, backend, settings)
    assert sorted(r["id"] for r in records) == [it.id for it in ITEMS]
    counts = {r["id"]: r["samples"] for r in records}
    assert sum(counts.values()) == 13 and min(counts.values()) >= (2 if allocation == "agreement" else 1)
    for r in records:
        assert r["tokens"] <= 6 * r["samples"] and len(r["scores"]) == len(r["final_answers"]) == r["samples"]
        assert r["reference"] == str(2 * int(r["id"][1:])) and r["correct"] is False  # the tiny model
    if allocation == "even":
        assert sorted(counts.values()) == [2, 2, 3, 3, 3]
    if allocation == "score":
        assert all(r["self_evals"] == r["samples"] for r in records)


def test_score_allocation_follows_the_rule_round_by_round(backend, monkeypatch):
    """Every allocation round gives its samples to the prompts ``rules.allocate`` ranks neediest."""
    from sgl_adaptive import batch, rules

    seen = []

    def spy(kind, prompts, slots, eligible=None):
        chosen = rules.allocate(kind, prompts, slots, eligible)
        bests = [max(s for s in scores if s is not None) for scores, _ in prompts]
        seen.append((bests, list(eligible), chosen))
        return chosen

    monkeypatch.setattr(batch, "allocate", spy)
    run_batch(ITEMS, backend, BatchSettings(11, "samples", "score", "best-of-n", 2, CONFIG))
    assert seen and seen[-1][2] == []  # the last call found no budget left
    for bests, eligible, chosen in seen[:-1]:
        assert len(chosen) <= 2
        assert all(bests[c] <= bests[o] for c in chosen for o in eligible if o not in chosen)


def test_a_token_budget_is_never_exceeded(backend):
    records = run_batch(ITEMS, backend, BatchSettings(47, "tokens", "score", "best-of-n", 2, CONFIG))
    assert len(records) == len(ITEMS) and sum(r["tokens"] for r in records) <= 47
    assert all(r["samples"] >= 1 for r in records)


def test_adaptive_closes_a_prompt_once_its_stop_rule_holds(backend):
    config = MethodConfig(max_new_tokens=6, temperature=1.0, threshold=0.0)  # every score stops
    records = run_batch(ITEMS, backend, BatchSettings(20, "samples", "score", "adaptive", 3, config))
    assert [r["samples"] for r in records] == [1] * len(ITEMS)
    capped = MethodConfig(max_new_tokens=6, temperature=1.0, n=2)
    records = run_batch(ITEMS, backend, BatchSettings(20, "samples", "even", "best-of-n", 3, capped))
    assert [r["samples"] for r in records] == [2] * len(ITEMS)  # --n caps each prompt


def test_a_batch_is_deterministic_under_its_seed(backend):
    settings = BatchSettings(12, "samples", "score", "best-of-n", 3, CONFIG)
    assert run_batch(ITEMS, backend, settings) == run_batch(ITEMS, backend, settings)


def test_the_output_is_appended_per_prompt_and_a_rerun_resumes(backend, tmp_path):
    prompts = write_prompts(
        tmp_path / "p.jsonl",
        [json.dumps({"id": it.id, "prompt": it.prompt, "reference": it.reference}) for it in ITEMS],
    )
    out = tmp_path / "out.jsonl"
    settings = BatchSettings(12, "samples", "score", "best-of-n", 3, CONFIG)
    summary, even = run_batch_file(prompts, out, lambda: backend, settings)
    lines = read_lines(out)
    assert sorted(r["id"] for r in lines) == [it.id for it in ITEMS] and even is None
    assert (summary.prompts, summary.samples, summary.graded, summary.accuracy) == (5, 12, 5, 0.0)
    # interrupted after two prompts, the third line torn: the rerun keeps them and does the rest
    kept = out.read_text(encoding="utf-8").splitlines(keepends=True)[:2]
    out.write_text("".join(kept) + '{"id": "q', encoding="utf-8")
    resumed, _ = run_batch_file(prompts, out, lambda: backend, settings)
    again = read_lines(out)
    assert again[:2] == [json.loads(line) for line in kept]
    assert sorted(r["id"] for r in again) == [it.id for it in ITEMS]
    assert resumed.samples <= 12 and resumed.prompts == 5
    # all done: nothing is loaded
    run_batch_file(prompts, out, lambda: pytest.fail("loaded a backend"), settings)
    assert read_lines(out) == again


def test_the_batch_command_end_to_end(tiny_model_dir, tmp_path):
    from sgl_adaptive.cli import app

    prompts = write_prompts(
        tmp_path / "p.jsonl",
        [
            json.dumps({"id": f"g{i}", "question": f"What is {i} + 1?", "answer": f"#### {i + 1}"})
            for i in range(3)
        ],
    )
    out = tmp_path / "out.jsonl"
    args = ["batch", str(prompts), "--budget", "5", "--out", str(out), "--model", str(tiny_model_dir)]
    res = CliRunner().invoke(app, [*args, "--max-new-tokens", "6", "--compare-even"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    lines = read_lines(out)
    assert [r["id"] for r in lines] and sorted(r["id"] for r in lines) == ["g0", "g1", "g2"]
    assert sum(r["samples"] for r in lines) == 5
    assert "batch: 3 prompts | 5 samples" in res.output and "accuracy 0.0% of 3" in res.output
    assert "even split: accuracy 0.0%, 5 samples" in res.output
    assert "round 1: a sample for each of 3 prompts" in res.output
