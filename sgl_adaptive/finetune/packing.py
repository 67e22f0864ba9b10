"""One packed forward per prompt: every self-evaluation example of a prompt (its K responses, each in
full and cut at each budget) as one token tree.

Each example's token ids are exactly what ``score_examples`` feeds (``SelfEvalEncoder.prompt_ids``), and
they are inserted into a trie: the prompt is one path, each response branches from it, and each
evaluation turn branches from its response at its cut. A node attends to itself and its ancestors
(``ancestor_mask``) and its position id is its depth, so every example computes what it computes
alone; the tree only removes the repeated prefixes. Parents precede their children, so the mask is
lower-triangular and every query row attends to at least itself: no row is fully masked, which
matters for the GPU attention kernels (``batching.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np

ATTENTION = "sgl_adaptive_tree"
"""The attention implementation ``tree_attention`` registers with transformers."""
BLOCK_ROWS = 256
"""Query rows per attention block: each block attends only to the union of its rows' ancestors."""


@dataclass(frozen=True)
class PackedTree:
    """A token trie of several sequences, nodes in creation order (a parent before its children)."""

    input_ids: list[int]
    positions: list[int]
    """Depth of each node: the position of its token in every sequence through it."""
    parents: list[int]
    """Parent node of each node; -1 for the first token of a sequence."""
    ends: list[int]
    """Per sequence, in the order given: the node of its last token."""

    @property
    def size(self) -> int:
        return len(self.input_ids)

    def ancestor_mask(self) -> np.ndarray:
        """``[N, N]`` bool: entry (i, j) is True when node j is node i or one of its ancestors."""
        n = self.size
        mask = np.zeros((n, n), dtype=bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                mask[i, : parent + 1] = mask[parent, : parent + 1]
            mask[i, i] = True
        return mask

    def path(self, node: int) -> list[int]:
        """The nodes from the root to ``node`` (inclusive)."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]


@dataclass(frozen=True)
class AttentionBlock:
    """Query rows ``start:stop`` of a tree and the only keys any of them sees."""

    start: int
    stop: int
    keys: Any
    """Long tensor of key nodes: the union of the rows' ancestors."""
    mask: Any
    """Bool tensor ``[stop - start, len(keys)]`` (True: attend)."""


def attention_blocks(tree: PackedTree, rows: int = BLOCK_ROWS) -> list[AttentionBlock]:
    """The tree's attention cut into blocks of ``rows`` consecutive queries, each with its own keys.

    A response's nodes are consecutive and see only the prompt and their own branch, so a block's keys
    are about prompt + response rather than the whole tree: attention costs ~K times less for K
    responses than the dense ``[N, N]`` mask, and the result is the same (a key outside the union gets
    zero weight either way)."""
    import torch

    mask = tree.ancestor_mask()
    blocks = []
    for start in range(0, tree.size, rows):
        stop = min(start + rows, tree.size)
        keys = np.flatnonzero(mask[start:stop].any(0))
        blocks.append(
            AttentionBlock(start, stop, torch.from_numpy(keys), torch.from_numpy(mask[start:stop][:, keys]))
        )
    return blocks


_BLOCKS: ContextVar[list[AttentionBlock] | None] = ContextVar("sgl_adaptive_tree_blocks", default=None)


def _tree_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature: blockwise attention over the active tree (plain SDPA
    when none is active). query ``[1, heads, N, d]``, key/value ``[1, kv_heads, N, d]``."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    blocks = _BLOCKS.get()
    if blocks is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    outputs = []
    for b in blocks:
        keys = b.keys.to(query.device)
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, b.start : b.stop],
                key[:, :, keys],
                value[:, :, keys],
                attn_mask=b.mask.to(query.device),
                scale=scaling,
            )
        )
    return torch.cat(outputs, 2).transpose(1, 2).contiguous(), None


@contextmanager
def tree_attention(model: Any, tree: PackedTree) -> Iterator[None]:
    """Within the block, ``model``'s attention runs blockwise over ``tree`` (``attention_blocks``)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _tree_attention_forward)
    configs = {id(c): c for c in (model.config, getattr(model.config, "text_config", None)) if c is not None}
    before = {i: c._attn_implementation for i, c in configs.items()}
    token = _BLOCKS.set(attention_blocks(tree))
    for c in configs.values():
        c._attn_implementation = ATTENTION
    try:
        yield
    finally:
        _BLOCKS.reset(token)
        for i, c in configs.items():
            c._attn_implementation = before[i]


def build_tree(sequences: Sequence[Sequence[int]]) -> PackedTree:
    """The trie of ``sequences`` (each non-empty); equal prefixes share nodes."""
    children: dict[tuple[int, int], int] = {}
    ids: list[int] = []
    positions: list[int] = []
    parents: list[int] = []
    ends: list[int] = []
    for seq in sequences:
        if not seq:
            raise ValueError("cannot pack an empty sequence")
        node = -1
        for depth, token in enumerate(seq):
            key = (node, int(token))
            child = children.get(key)
            if child is None:
                child = len(ids)
                children[key] = child
                ids.append(int(token))
                positions.append(depth)
                parents.append(node)
            node = child
        ends.append(node)
    return PackedTree(ids, positions, parents, ends)


def group_by_prompt(examples: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of the examples of each prompt (``prompt_id``, else the prompt text), in order of first
    appearance."""
    groups: dict[Any, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.get("prompt_id", ex["prompt"]), []).append(i)
    return list(groups.values())


def tree_inputs(tree: PackedTree, device: Any = "cpu") -> dict[str, Any]:
    """Keyword arguments of a causal LM's forward for the tree as one row: ``input_ids`` and
    ``position_ids`` ``[1, N]`` and a 4-D bool ``attention_mask`` ``[1, 1, N, N]`` (True: attend), which
    transformers passes to the attention as it is."""
    import torch

    return {
        "input_ids": torch.tensor([tree.input_ids], dtype=torch.long, device=device),
        "position_ids": torch.tensor([tree.positions], dtype=torch.long, device=device),
        "attention_mask": torch.from_numpy(tree.ancestor_mask())[None, None].to(device),
    }


def score_packed(
    model: Any,
    encoder: Any,
    examples: Sequence[dict[str, Any]],
    *,
    on_prompt: Callable[[int], None] | None = None,
) -> list[Any]:
    """``scoring.score_examples`` with one forward per prompt: the same ``ExampleScore`` per example, in
    order (equal up to float rounding). ``on_prompt(n)`` is called with each prompt's example count."""
    import torch

    from sgl_adaptive.backends.precision import ExactHead
    from sgl_adaptive.finetune.batching import HeadGather
    from sgl_adaptive.finetune.scoring import answer_scores

    device = next(model.parameters()).device
    out: list[Any] = [None] * len(examples)
    with HeadGather(model) as gather, ExactHead(model) as exact:
        for group in group_by_prompt(examples):
            tree = build_tree([encoder.prompt_ids(examples[i]["prompt"], examples[i]["text"]) for i in group])
            ends = torch.tensor([tree.ends], dtype=torch.long)
            with torch.no_grad(), gather.at(ends), tree_attention(model, tree):
                logits = model(**tree_inputs(tree, device), logits_to_keep=0).logits[0].float()
            hidden = exact.hidden[0] if exact.enabled and exact.hidden is not None else None
            rows = [examples[i] for i in group]
            for i, score in zip(group, answer_scores(encoder, logits, rows, exact, hidden), strict=True):
                out[i] = score
            if on_prompt:
                on_prompt(len(group))
    return out


def packed_token_counts(encoder: Any, examples: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Tokens forwarded one example at a time against packed per prompt (for the benchmark)."""
    unpacked = packed = 0
    for group in group_by_prompt(examples):
        seqs = [encoder.prompt_ids(examples[i]["prompt"], examples[i]["text"]) for i in group]
        unpacked += sum(len(s) for s in seqs)
        packed += build_tree(seqs).size
    return {"unpacked_tokens": unpacked, "packed_tokens": packed}
