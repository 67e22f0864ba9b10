import pytest

from sgl_adaptive.answers import check_math, extract_number, gsm8k_reference, numbers_equal
from sgl_adaptive.data import read_jsonl, split_records
from sgl_adaptive.errors import UserError


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("so 3 + 4 = 7. The answer is 7.", "7"),
        ("The answer is $1,234.", "1234"),
        ("we get \\boxed{72} in total", "72"),
        ("first 5 then 10 and finally 12", "12"),
        ("#### 18", "18"),
        ("The answer is: **-3.50**", "-3.5"),
        ("no digits here", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_gsm8k_reference_and_equality():
    assert gsm8k_reference("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert numbers_equal("72", "72.0") and not numbers_equal("72", None)


def test_check_math_uses_math_verify():
    assert check_math("The final answer is $\\frac{1}{2}$", "\\frac{1}{2}")
    assert not check_math("The final answer is $3$", "\\frac{1}{2}")


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(UserError, match=r"d\.jsonl:3: malformed JSON"):
        list(read_jsonl(path))
    with pytest.raises(UserError, match="not found"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_split_is_deterministic_and_disjoint():
    records = [{"question": f"q{i}"} for i in range(1000)]
    train, dev = split_records(records, "question", 0.1)
    assert len(train) + len(dev) == 1000 and 50 < len(dev) < 150
    assert split_records(list(reversed(records)), "question", 0.1)[1] == list(reversed(dev))
    assert not {r["question"] for r in train} & {r["question"] for r in dev}
