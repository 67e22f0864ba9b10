"""Batches for training and scoring that need no attention mask, and logits read at chosen positions.

Rows are right-padded and sent **without** an attention mask. Under causal attention a token only sees
the tokens before it, so the padding after a row's last real token can never reach that row's real
tokens: each row computes exactly what it would alone, and no query row is ever fully masked. The
model then runs plain causal attention (``is_causal``), never an explicit mask tensor.

That matters on a GPU. Left padding with a mask (this package's first design) gives every pad
position a query row with nothing to attend to, whose log-sum-exp is -inf. The cuDNN attention
backward that torch ≥ 2.9 uses by default on Hopper GPUs returns NaN query gradients when an explicit
mask is passed, the sequence length is 64 mod 128 and some row's log-sum-exp is below ln(FLT_MAX)
(pytorch/pytorch#196678; hit through Qwen2.5's massive-activation head in huggingface/trl#7181): finite
loss, NaN gradient, only on the batches whose padded width is 64 mod 128. That is the first GPU run's
signature (H200, torch 2.11: finite losses, then grad_norm nan in one logging window, NaN weights
after it); ``attention_check`` reproduces or refutes it on a device in one command.

``HeadGather`` applies the output head only where a loss or a score needs it: position ``len - 2``
(which predicts the answer token) of each row, and for the KL guard the response positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids ``[batch, width]``, lengths ``[batch]``): rows padded on the right with ``pad_id``."""
    import torch

    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, lengths


def fully_masked_query_rows(attention_mask: Any | None, width: int) -> int:
    """How many (row, position) queries of a causal batch attend to nothing: 0 without a mask; with a
    left-padded 2-D mask, every pad position."""
    import torch

    if attention_mask is None:
        return 0
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    return int((~allowed.any(-1)).sum())


class HeadGather:
    """Applies a causal LM's output head only at chosen positions of each row.

    A forward pre-hook on the head replaces its input ``[batch, seq, hidden]`` by
    ``hidden[b, index[b, k]]`` → ``[batch, K, hidden]`` while an index is set (``at``), so
    ``model(..., logits_to_keep=0).logits`` is ``[batch, K, vocab]`` instead of the whole sequence's
    logits. Gradients flow through the gather. Without an index the model is unchanged."""

    def __init__(self, model: Any) -> None:
        self.index: Any = None
        self._hook = model.get_output_embeddings().register_forward_pre_hook(self._gather)

    def _gather(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.index is None:
            return None
        hidden = args[0]
        index = self.index.to(hidden.device)
        picked = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return (picked, *args[1:])

    @contextmanager
    def at(self, index: Any) -> Iterator[None]:
        """Within the block, the head reads positions ``index`` (``[batch, K]`` long)."""
        self.index = index
        try:
            yield
        finally:
            self.index = None

    def close(self) -> None:
        self._hook.remove()

    def __enter__(self) -> HeadGather:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
