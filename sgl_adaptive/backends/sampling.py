"""Next-token sampling for a batch whose rows have their own parameters and random generators.

Each request owns a ``torch.Generator`` seeded from the backend seed and the request, so a
request's tokens do not depend on which other requests share its batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class RowSampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    generator: torch.Generator = field(default_factory=torch.Generator)
    counts: Counter = field(default_factory=Counter)
    """Generated token counts (for the penalties)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-6


def sample_next(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Sample one token per row from ``logits`` [batch, vocab] (float32)."""
    logits = _apply_penalties(logits, rows)
    greedy_ids = logits.argmax(dim=-1)
    if all(r.greedy for r in rows):
        return greedy_ids
    device = logits.device
    temps = torch.tensor([max(r.temperature, 1e-6) for r in rows], device=device)[:, None]
    scaled = logits / temps
    if any(r.top_k > 0 for r in rows):
        scaled = _top_k(scaled, [r.top_k for r in rows])
    if any(r.top_p < 1.0 for r in rows):
        scaled = _top_p(scaled, torch.tensor([r.top_p for r in rows], device=device))
    if any(r.min_p > 0.0 for r in rows):
        probs = torch.softmax(scaled, dim=-1)
        floor = (
            probs.max(dim=-1, keepdim=True).values
            * torch.tensor([r.min_p for r in rows], device=device)[:, None]
        )
        scaled = scaled.masked_fill(probs < floor, float("-inf"))
    cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(device)
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    is_greedy = torch.tensor([r.greedy for r in rows], device=device)
    return torch.where(is_greedy, greedy_ids, sampled)


def _apply_penalties(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    if not any((r.frequency_penalty or r.presence_penalty) and r.counts for r in rows):
        return logits
    logits = logits.clone()
    for i, r in enumerate(rows):
        if (r.frequency_penalty or r.presence_penalty) and r.counts:
            ids = torch.tensor(list(r.counts), device=logits.device)
            counts = torch.tensor(list(r.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[i, ids] -= r.frequency_penalty * counts + r.presence_penalty
    return logits


def _top_k(scaled: torch.Tensor, ks: list[int]) -> torch.Tensor:
    k_max = min(max(ks), scaled.shape[-1])
    top = torch.topk(scaled, k_max, dim=-1).values
    kth = torch.stack(
        [
            top[i, min(k, k_max) - 1] if k > 0 else torch.tensor(float("-inf"), device=scaled.device)
            for i, k in enumerate(ks)
        ]
    )
    return scaled.masked_fill(scaled < kth[:, None], float("-inf"))


def _top_p(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    sorted_logits = sorted_logits.masked_fill(before > top_p[:, None], float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
