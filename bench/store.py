"""Append-only, resumable JSON Lines: one object per line, each with a unique ``key``.

On open, the existing keys are read (a line that does not parse, such as the last one after a
kill, is ignored); appends write one whole line, flushed and fsynced, and the first append after
a truncated line starts on a new line. A rerun skips the keys already present, so a run killed at
any point loses at most the lines in flight and never writes a key twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def config_hash(obj: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-serialisable object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def read_lines(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every well-formed object line of ``path`` (none if it does not exist); broken lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj


class JsonlStore:
    """A JSONL file of keyed records, safe to append to from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        for obj in read_lines(self.path):
            key = obj.get("key")
            if isinstance(key, str) and key not in self._records:
                self._records[key] = obj
        self._needs_newline = self._ends_without_newline()

    def _ends_without_newline(self) -> bool:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return False
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(key)

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def append(self, record: dict[str, Any]) -> bool:
        """Write ``record`` (which must have a ``key``) unless its key is present; True if written."""
        key = record["key"]
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            if key in self._records:
                return False
            if self._needs_newline:
                line = "\n" + line
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self._needs_newline = False
            self._records[key] = record
        return True
