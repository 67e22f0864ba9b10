"""Bench datasets: resolve a name or file to questions in a fixed order, and grade responses.

Names: ``gsm8k`` (HF ``openai/gsm8k``, test split), ``gsm8k-dev`` (the project's dev split of
``shared/data/gsm8k-train.jsonl``, the questions the fine-tuning does not train on), ``math-500``
(HF ``HuggingFaceH4/MATH-500``), any other HF ``org/name``, or a local ``.jsonl`` file with
``question``/``answer`` (GSM8K), ``problem``/``answer`` (MATH, checked with math-verify) or
``prompt`` (general prompts, optional ``reference`` output, judged by a reward model).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sgl_adaptive.answers import check_math, extract_number, gsm8k_prompt, gsm8k_reference, numbers_equal
from sgl_adaptive.data import load_records, read_jsonl, split_records
from sgl_adaptive.errors import UserError

Task = Literal["gsm8k", "math", "general"]
TASKS: tuple[str, ...] = ("gsm8k", "math", "general")

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
GSM8K_TRAIN_FILE = "gsm8k-train.jsonl"
DEV_FRACTION = 0.1
"""The project's GSM8K train/dev split (``sgl_adaptive.data.split_records`` on the question)."""


@dataclass(frozen=True)
class Alias:
    """A dataset known by a short name."""

    source: str
    """HF dataset name, or a file name under the data root (``local``)."""
    task: Task
    split: str
    config: str | None = None
    local: bool = False


ALIASES: dict[str, Alias] = {
    "gsm8k": Alias("openai/gsm8k", "gsm8k", "test", "main"),
    "openai/gsm8k": Alias("openai/gsm8k", "gsm8k", "test", "main"),
    "gsm8k-dev": Alias(GSM8K_TRAIN_FILE, "gsm8k", "dev", local=True),
    "math-500": Alias("HuggingFaceH4/MATH-500", "math", "test"),
    "HuggingFaceH4/MATH-500": Alias("HuggingFaceH4/MATH-500", "math", "test"),
}


@dataclass(frozen=True)
class Item:
    """One question: a stable id, the prompt sent to the model and what grading needs."""

    qid: str
    index: int
    prompt: str
    task: Task
    reference: str | None = None
    """GSM8K/MATH: the reference answer; general prompts: a reference output (may be None)."""


@dataclass(frozen=True)
class Dataset:
    name: str
    """The label stored in every result line (an alias, a HF name or a file name)."""
    split: str
    task: Task
    items: list[Item]


def data_roots(data_root: str | None = None) -> list[Path]:
    """Where ``gsm8k-dev`` is looked for: ``--data-root``, ``$SGLADAPTIVE_DATA``, then ``../shared/data``
    relative to the working directory and to the repository."""
    roots = [Path(p).expanduser() for p in (data_root, os.environ.get("SGLADAPTIVE_DATA")) if p]
    if data_root:
        return roots[:1]
    repo = Path(__file__).resolve().parents[1]
    return [*roots, Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]


def _find_local(file_name: str, data_root: str | None) -> Path:
    roots = data_roots(data_root)
    for root in roots:
        if (root / file_name).is_file():
            return root / file_name
    tried = ", ".join(str(r) for r in roots)
    raise UserError(f"{file_name} not found (looked in {tried}); give --data-root DIR")


def detect_task(record: dict[str, Any], where: str) -> Task:
    """GSM8K (``question``/``answer``), MATH (``problem``/``answer``) or general (``prompt``)."""
    if "question" in record and "answer" in record:
        return "gsm8k"
    if "problem" in record and "answer" in record:
        return "math"
    if "prompt" in record:
        return "general"
    raise UserError(
        f"{where}: cannot tell the task: expected question/answer, problem/answer or prompt fields "
        f"(got {', '.join(sorted(record)) or 'none'})"
    )


def _question_id(record: dict[str, Any], index: int, text: str) -> str:
    if record.get("id") not in (None, ""):
        return str(record["id"])
    return f"{index}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def make_item(record: dict[str, Any], index: int, task: Task, where: str) -> Item:
    """An ``Item`` from a record; a missing field is a one-line error naming where it came from."""
    try:
        if task == "gsm8k":
            question = str(record["question"])
            reference = gsm8k_reference(str(record["answer"]))
            return Item(_question_id(record, index, question), index, gsm8k_prompt(question), task, reference)
        if task == "math":
            problem = str(record["problem"])
            prompt = f"{problem.strip()}\n{MATH_INSTRUCTION}"
            return Item(_question_id(record, index, problem), index, prompt, task, str(record["answer"]))
        prompt = str(record["prompt"])
        reference = record.get("reference") or record.get("reference_output") or record.get("output")
        return Item(
            _question_id(record, index, prompt), index, prompt, task, str(reference) if reference else None
        )
    except KeyError as exc:
        raise UserError(f"{where}: item {index} has no {exc.args[0]!r} field") from None
    except ValueError as exc:
        raise UserError(f"{where}: item {index}: {exc}") from None


def load_dataset_items(
    name: str,
    split: str | None = None,
    limit: int | None = None,
    data_root: str | None = None,
    task: str | None = None,
) -> Dataset:
    """The first ``limit`` items of a dataset in its own order (deterministic)."""
    if task is not None and task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)} (got {task!r})")
    alias = ALIASES.get(name)
    path = Path(name).expanduser()
    if alias is not None and alias.local:
        split = split or alias.split
        if split not in ("dev", "train"):
            raise UserError(f"--split for {name} must be dev or train (got {split!r})")
        file = _find_local(alias.source, data_root)
        train, dev = split_records(list(read_jsonl(file)), "question", DEV_FRACTION)
        records, label, where = (dev if split == "dev" else train), name, str(file)
    elif alias is not None:
        split = split or alias.split
        records, label, where = _load_hub(alias.source, split, alias.config), alias.source, alias.source
    elif name.endswith(".jsonl") or path.is_file():
        if path.is_dir():
            raise UserError(f"--dataset {name} is a directory, not a JSONL file")
        split = split or "all"
        records, label, where = list(read_jsonl(path)), path.name, str(path)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        split = split or "test"
        records, label, where = _load_hub(name, split), name, name
    else:
        known = ", ".join(k for k in ALIASES if "/" not in k)
        raise UserError(f"unknown dataset {name!r}: give one of {known}, a HF name org/name or a .jsonl file")
    if not records:
        raise UserError(f"dataset {name!r} (split {split!r}) has no items")
    chosen: Task = task or detect_task(records[0], where)  # type: ignore[assignment]
    records = records[:limit] if limit is not None else records
    items = [make_item(r, i, chosen, where) for i, r in enumerate(records)]
    return Dataset(label, split, chosen, items)


def _load_hub(name: str, split: str, config: str | None = None) -> list[dict[str, Any]]:
    """A Hugging Face dataset; the hub client's retry warnings are silenced (the error is one line)."""
    import logging

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return load_records(name, split, config)
    finally:
        hub_logger.setLevel(level)


# ---- grading ---------------------------------------------------------------------------------------------


def boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def answer_key(task: Task, response: str) -> str | None:
    """The final answer as a string to vote on (majority): a number for GSM8K, the boxed content for MATH."""
    if task == "gsm8k":
        return extract_number(response)
    if task == "math":
        content = boxed(response)
        return re.sub(r"\s+", "", content) if content is not None else extract_number(response)
    return None


def is_correct(item: Item, response: str) -> bool:
    """GSM8K: the final number equals the reference; MATH: math-verify equivalence."""
    if item.task == "gsm8k":
        return numbers_equal(extract_number(response), item.reference)
    if item.task == "math":
        return check_math(response, item.reference or "")
    raise ValueError("general prompts are graded by a judge, not checked")


Judge = Callable[[Item, list[str]], list[float]]
"""Quality of responses to a general prompt (reward, or win rate against the reference)."""


def grade(item: Item, responses: list[str], judge: Judge | None = None) -> list[float]:
    """Quality of each response: 1.0/0.0 for verifiable tasks, the judge's value for general prompts."""
    if item.task == "general":
        if judge is None:
            raise UserError("general prompts need a judge: give --judge-model PATH (an HF reward model)")
        return judge(item, responses)
    return [1.0 if is_correct(item, r) else 0.0 for r in responses]
