"""Text -> token ids that keep generated tokens exactly as they were generated.

The SGLang interpreter sends the backend the full text of a program state. Re-tokenising a
generated response can choose different tokens than the ones sampled (or move a boundary at the
join), so the prefix cache would miss and a paused sample would continue from other tokens. We
remember (text, ids) for every prompt and output the backend produced, and encode a new text as
the ids of its longest remembered prefix plus the tokenisation of the remainder.

An output whose tokens decode to no text (ids past the tokenizer's vocabulary in a padded output head,
special tokens the decoding skips) is not remembered: the request's own text would then map to its ids
plus those tokens, and every later request with that text (a re-evaluation of the same response, another
fork) would read them too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class TokenMemo:
    """Bounded, thread-safe memory of texts whose exact token ids are known."""

    def __init__(self, tokenizer: Any, max_entries: int = 1024) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._known: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, text: str, ids: list[int]) -> None:
        if not text:
            return
        with self._lock:
            self._known[text] = tuple(ids)
            self._known.move_to_end(text)
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)

    def remember_output(self, text: str, ids: list[int], out_text: str, out_ids: list[int]) -> None:
        """Remember that a request ``text`` (encoded as ``ids``) continued by ``out_text`` is ``ids +
        out_ids``; nothing when ``out_text`` is empty, so the encoding of ``text`` itself never changes."""
        if out_text:
            self.remember(text + out_text, ids + out_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: exact ids of the longest known prefix + tokenisation of the rest."""
        with self._lock:
            best = ""
            for known in self._known:
                if len(known) > len(best) and text.startswith(known):
                    best = known
            prefix_ids = list(self._known[best]) if best else []
            if best:
                self._known.move_to_end(best)
        rest = text[len(best) :]
        rest_ids = self.tokenizer.encode(rest, add_special_tokens=False) if rest else []
        return prefix_ids + rest_ids
