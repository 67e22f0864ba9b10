"""Final-answer extraction and checking for verifiable tasks (GSM8K numbers, MATH expressions)."""

from __future__ import annotations

import re

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_PATTERNS = [
    re.compile(r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")"),
    re.compile(r"answer is[:\s]*\$?\s*\**\s*(" + _NUMBER + r")", re.IGNORECASE),
    re.compile(r"####\s*\$?\s*(" + _NUMBER + r")"),
]


def _clean(number: str) -> str:
    value = number.replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value or "0"


def extract_number(text: str) -> str | None:
    """The final numeric answer of a response: ``\\boxed{}``, "The answer is N", "#### N", else the last number."""
    for pattern in _PATTERNS:
        found = pattern.findall(text)
        if found:
            return _clean(found[-1])
    numbers = re.findall(_NUMBER, text)
    return _clean(numbers[-1]) if numbers else None


def gsm8k_reference(answer_field: str) -> str:
    """The reference number of a GSM8K ``answer`` field (after ``####``)."""
    if "####" not in answer_field:
        number = extract_number(answer_field)
        if number is None:
            raise ValueError("no reference number in the answer field")
        return number
    return _clean(answer_field.split("####")[-1].strip())


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b


def check_math(response: str, reference: str) -> bool:
    """MATH-style check with ``math-verify`` (LaTeX/expressions); falls back to numbers."""
    try:
        from math_verify import parse, verify

        gold = parse(reference if "$" in reference or "\\" in reference else f"${reference}$")
        return bool(verify(gold, parse(response)))
    except Exception:
        return numbers_equal(extract_number(response), extract_number(reference))


GSM8K_INSTRUCTION = (
    "Solve the problem step by step. At the end, write 'The answer is N' where N is the final number."
)


def gsm8k_prompt(question: str) -> str:
    """The prompt used for GSM8K everywhere in the project (data building, bench)."""
    return f"{question.strip()}\n{GSM8K_INSTRUCTION}"
