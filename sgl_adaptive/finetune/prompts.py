"""Prompt sets for data building: GSM8K-style (question/answer), MATH-style (problem/solution) or plain
prompts (prompt/instruction/text), from a local JSONL file or a Hugging Face dataset."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

from sgl_adaptive.answers import gsm8k_prompt, gsm8k_reference
from sgl_adaptive.data import load_records, split_records
from sgl_adaptive.errors import UserError

Part = Literal["train", "dev", "all"]
BENCH_DEV_FRACTION = 0.1
"""The bench evaluates on ``split_records(records, "question", 0.1)[1]``: data building uses the other part."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt to sample from, with the reference a verifier checks against (if any)."""

    id: str
    prompt: str
    reference: str | None = None
    kind: Literal["gsm8k", "math", "plain"] = "plain"


def _stable_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def to_item(record: dict[str, Any], prompt_field: str | None = None) -> PromptItem:
    """Recognise a record's shape and build its prompt (GSM8K questions get the project's prompt)."""
    rid = record.get("id")
    if prompt_field:
        if prompt_field not in record:
            raise UserError(f"a record has no field {prompt_field!r} (fields: {', '.join(record)})")
        text = str(record[prompt_field])
        return PromptItem(str(rid) if rid is not None else _stable_id("p", text), text)
    if "question" in record and "answer" in record:
        question = str(record["question"])
        return PromptItem(
            str(rid) if rid is not None else _stable_id("gsm8k", question),
            gsm8k_prompt(question),
            gsm8k_reference(str(record["answer"])),
            "gsm8k",
        )
    if "problem" in record and ("answer" in record or "solution" in record):
        problem = str(record["problem"])
        reference = str(record.get("answer") or record["solution"])
        return PromptItem(
            str(rid) if rid is not None else _stable_id("math", problem), problem, reference, "math"
        )
    for field in ("prompt", "instruction", "text", "question", "problem"):
        if field in record:
            text = str(record[field])
            return PromptItem(str(rid) if rid is not None else _stable_id("p", text), text)
    raise UserError(f"cannot find a prompt in a record with fields {', '.join(record)} (use --prompt-field)")


def load_prompts(
    source: str,
    *,
    split: str = "train",
    config: str | None = None,
    part: Part = "train",
    prompt_field: str | None = None,
    limit: int | None = None,
    shuffle_seed: int | None = None,
) -> list[PromptItem]:
    """Prompt items of a JSONL file or HF dataset. Records keyed by ``question`` are split as the bench
    splits them and only ``part`` is kept, so training data never includes the bench's dev questions."""
    records = load_records(source, split=split, config=config)
    if part != "all" and records and "question" in records[0]:
        train, dev = split_records(records, "question", BENCH_DEV_FRACTION)
        records = train if part == "train" else dev
    items = [to_item(r, prompt_field) for r in records]
    items = [it for it in items if it.prompt.strip()]
    seen: set[str] = set()
    unique = []
    for it in items:
        if it.id not in seen:
            seen.add(it.id)
            unique.append(it)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(unique)
    if not unique:
        raise UserError(f"no prompts in {source}")
    return unique[:limit] if limit else unique
