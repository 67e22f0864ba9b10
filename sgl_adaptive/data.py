"""Reading prompt sets: local JSON Lines (with line-numbered errors) or Hugging Face datasets, and
deterministic train/dev splits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sgl_adaptive.errors import UserError


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Objects of a JSON Lines file; a malformed line is a one-line ``UserError`` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{number}: expected a JSON object")
            yield obj


def load_records(name_or_file: str, split: str = "train", config: str | None = None) -> list[dict[str, Any]]:
    """Records of a local ``.jsonl`` file, or of a Hugging Face dataset (``datasets.load_dataset``)."""
    if name_or_file.endswith(".jsonl") or Path(name_or_file).exists():
        return list(read_jsonl(name_or_file))
    try:
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(name_or_file, config, split=split)]
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load dataset {name_or_file!r} (split {split!r}): {first}") from None


def stable_fraction(key: str, salt: str = "sgl-adaptive") -> float:
    """A deterministic number in [0, 1) from a string (for splits independent of file order)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(
    records: list[dict[str, Any]], key_field: str, dev_fraction: float = 0.1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic (train, dev) split by a hash of each record's ``key_field`` (e.g. the question)."""
    train, dev = [], []
    for record in records:
        (dev if stable_fraction(str(record[key_field])) < dev_fraction else train).append(record)
    return train, dev
