"""Bench datasets: names and files, fixed order, ids, one-line errors, grading."""

from __future__ import annotations

import json

import pytest

from sgl_adaptive.bench.datasets import answer_key, grade, load_dataset_items
from sgl_adaptive.data import split_records
from sgl_adaptive.errors import UserError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_file_in_order_with_limit_and_stable_ids(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(5)]
    file = write(tmp_path / "g.jsonl", rows)
    ds = load_dataset_items(str(file), limit=3)
    assert ds.task == "gsm8k" and ds.name == "g.jsonl" and len(ds.items) == 3
    assert [i.reference for i in ds.items] == ["1", "2", "3"]
    assert "What is 0 + 1?" in ds.items[0].prompt and "The answer is" in ds.items[0].prompt
    assert [i.qid for i in ds.items] == [i.qid for i in load_dataset_items(str(file), limit=3).items]
    assert len({i.qid for i in ds.items}) == 3


def test_math_and_general_files_are_detected(tmp_path):
    math = load_dataset_items(
        str(write(tmp_path / "m.jsonl", [{"problem": "Half of 1?", "answer": "\\frac{1}{2}"}]))
    )
    assert math.task == "math" and "\\boxed{}" in math.items[0].prompt
    general = load_dataset_items(
        str(write(tmp_path / "p.jsonl", [{"id": "x1", "prompt": "Hi", "reference": "Hello"}]))
    )
    assert (
        general.task == "general" and general.items[0].qid == "x1" and general.items[0].reference == "Hello"
    )


def test_gsm8k_dev_is_the_projects_dev_split(tmp_path):
    rows = [{"question": f"Q{i}: what is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(60)]
    write(tmp_path / "gsm8k-train.jsonl", rows)
    _, dev = split_records(rows, "question", 0.1)
    ds = load_dataset_items("gsm8k-dev", data_root=str(tmp_path))
    assert ds.split == "dev" and [i.reference for i in ds.items] == [r["answer"][5:] for r in dev]
    train = load_dataset_items("gsm8k-dev", split="train", data_root=str(tmp_path))
    assert len(train.items) + len(ds.items) == 60


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: ("nosuchset", None), "unknown dataset 'nosuchset'"),
        (lambda p: (str(p / "missing.jsonl"), None), "file not found"),
        (lambda p: ("gsm8k-dev", str(p)), "gsm8k-train.jsonl not found"),
        (lambda p: (str(write(p / "x.jsonl", [{"text": "hi"}])), None), "cannot tell the task"),
    ],
)
def test_bad_datasets_are_one_line_errors(tmp_path, setup, message):
    name, root = setup(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        load_dataset_items(name, data_root=root)
    assert "\n" not in str(info.value)


def test_a_malformed_line_names_file_and_line(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"question": "a", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        load_dataset_items(str(file))


def test_grading_and_answer_keys(tmp_path):
    g = load_dataset_items(
        str(write(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "#### 2"}]))
    ).items[0]
    assert grade(g, ["So 1+1 = 2. The answer is 2.", "The answer is 3."]) == [1.0, 0.0]
    assert answer_key("gsm8k", "The answer is 1,000.") == "1000"
    m = load_dataset_items(
        str(write(tmp_path / "m.jsonl", [{"problem": "?", "answer": "\\frac{1}{2}"}]))
    ).items[0]
    assert grade(m, ["It is \\boxed{\\frac{1}{2}}.", "\\boxed{3}"]) == [1.0, 0.0]
    assert answer_key("math", "x \\boxed{\\frac{1}{ 2}} y") == "\\frac{1}{2}"
    p = load_dataset_items(str(write(tmp_path / "p.jsonl", [{"prompt": "Hi"}]))).items[0]
    with pytest.raises(UserError, match="judge"):
        grade(p, ["Hello"])
