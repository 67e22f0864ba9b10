"""A bounded prefix cache of KV tensors keyed by token ids (the in-process radix cache).

Entries are whole sequences (prompt + generated tokens) with their per-layer keys and values.
A lookup returns the entry sharing the longest common prefix with the query and that length:
the KV of any prefix of a cached sequence is valid for a causal model, so a new request reuses
it even when it diverges later (a second sample after the shared prompt, an evaluation turn after
a response). Memory is bounded in bytes with least-recently-used eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each shaped [kv_heads, seq_len, head_dim]."""


@dataclass
class CacheEntry:
    ids: np.ndarray
    kv: KV
    nbytes: int


class PrefixCache:
    """Longest-common-prefix lookup over cached sequences; not thread-safe (the engine thread owns it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()
        self._next_key = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, ids: Sequence[int]) -> tuple[CacheEntry | None, int]:
        """The entry with the longest common prefix with ``ids``, and that length."""
        query = np.asarray(ids, dtype=np.int64)
        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            m = min(len(entry.ids), len(query))
            if m <= best_len:
                continue
            same = entry.ids[:m] == query[:m]
            length = m if same.all() else int(np.argmin(same))
            if length > best_len:
                best_key, best_len = key, length
        if best_key is None:
            return None, 0
        self._entries.move_to_end(best_key)
        return self._entries[best_key], best_len

    def insert(self, ids: Sequence[int], kv: KV) -> None:
        """Cache ``kv`` (covering exactly ``ids``); entries that are prefixes of it are dropped."""
        query = np.asarray(ids, dtype=np.int64)
        if len(query) == 0:
            return
        for key, entry in list(self._entries.items()):
            m = min(len(entry.ids), len(query))
            if not np.array_equal(entry.ids[:m], query[:m]):
                continue
            if len(entry.ids) >= len(query):  # already covered
                self._entries.move_to_end(key)
                return
            self._drop(key)  # the new sequence extends it
        nbytes = sum(k.element_size() * k.nelement() + v.element_size() * v.nelement() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        self._entries[self._next_key] = CacheEntry(query, kv, nbytes)
        self._next_key += 1
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
