"""Cross-validation folds grouped by prompt: every example of a prompt lands in the same fold.

Two assignments, both deterministic in (seed, prompt id):

- ``fold_of``: sha256 of the salted seed and prompt id, modulo the number of folds. A prompt keeps its fold
  as data grows, but fold sizes are only balanced on average (5 folds of 342 prompts: about 68 +- 7).
- ``split_folds`` (what the out-of-fold tools use): the prompts sorted by that same hash and dealt
  round-robin, so fold sizes differ by at most one. Adding prompts can move others to a neighbouring
  fold; the choice is balance, which matters more than stability when every setting is chosen from a
  few hundred prompts (an unlucky small fold widens its intervals and skews the inner choices).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

FOLD_SALT = "sgl-adaptive-folds"
"""Keeps fold hashes independent of the per-prompt sampling seeds and of the held-out split."""


def prompt_hash(prompt_id: str, seed: int = 0) -> int:
    """64-bit sha256 hash of the salted seed and prompt id."""
    digest = hashlib.sha256(f"{FOLD_SALT}\x00{seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _check_folds(folds: int) -> None:
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds (got {folds})")


def fold_of(prompt_id: str, folds: int, seed: int = 0) -> int:
    """The fold of ``prompt_id`` by hash modulo ``folds``: stable as data grows, balanced only on average."""
    _check_folds(folds)
    return prompt_hash(prompt_id, seed) % folds


def unique_in_order(prompt_ids: Sequence[str]) -> list[str]:
    """The distinct prompt ids in order of first appearance."""
    return list(dict.fromkeys(prompt_ids))


def split_folds(prompt_ids: Sequence[str], folds: int = 5, seed: int = 0) -> list[list[str]]:
    """The distinct prompt ids dealt into ``folds`` folds: sorted by ``prompt_hash`` (ties by id), then
    round-robin, so sizes differ by at most one. Each fold keeps first-appearance order; repeats of an
    id (one per example) are fine."""
    _check_folds(folds)
    ids = unique_in_order(prompt_ids)
    if len(ids) < folds:
        raise ValueError(f"{folds} folds need at least {folds} prompts (got {len(ids)})")
    ranked = sorted(ids, key=lambda p: (prompt_hash(p, seed), p))
    fold = {p: i % folds for i, p in enumerate(ranked)}
    return [[p for p in ids if fold[p] == f] for f in range(folds)]


def fold_split(
    prompt_ids: Sequence[str], fold: int, folds: int = 5, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train ids, test ids) of ``fold``: the test ids are ``split_folds(...)[fold]``, the train ids the
    rest."""
    parts = split_folds(prompt_ids, folds, seed)
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be within 0..{folds - 1} (got {fold})")
    test = set(parts[fold])
    return [p for p in unique_in_order(prompt_ids) if p not in test], parts[fold]


def fold_indices(
    example_prompt_ids: Sequence[str], folds: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fold, (train, test) indices into ``example_prompt_ids`` (one prompt id per example)."""
    parts = split_folds(example_prompt_ids, folds, seed)
    fold = {p: f for f, part in enumerate(parts) for p in part}
    of_example = np.array([fold[p] for p in example_prompt_ids], dtype=int)
    return [(np.flatnonzero(of_example != f), np.flatnonzero(of_example == f)) for f in range(folds)]
