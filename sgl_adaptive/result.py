"""The result structure every program returns, and its JSON form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sgl_adaptive.costs import Costs


@dataclass
class Candidate:
    """One sample: its text so far, its latest score (by the configured scorer) and how it ended."""

    text: str
    score: float | None
    finished: bool
    """Stopped by the model (end of turn or a stop string) rather than by a token limit or pruning."""
    tokens: int
    temperature: float = 0.0
    round: int = 0
    pruned: bool = False
    scores: list[tuple[int, float]] = field(default_factory=list)
    """Every score of this sample as (tokens generated when evaluated, score)."""
    free_scores: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Training-free scores at the same points, by scorer name (only the bench's pools record them)."""
    logprobs: list[dict[str, Any]] | None = None
    """The tokens of ``text`` with their log-probabilities, when asked for (``MethodConfig.logprobs``): each
    ``{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}``; not in ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:
        """The candidate as plain JSON-ready values."""
        return {
            "text": self.text,
            "score": self.score,
            "finished": self.finished,
            "tokens": self.tokens,
            "temperature": self.temperature,
            "round": self.round,
            "pruned": self.pruned,
            "scores": [list(s) for s in self.scores],
            **(
                {"free_scores": {k: [list(s) for s in v] for k, v in self.free_scores.items()}}
                if self.free_scores
                else {}
            ),
        }


@dataclass
class Result:
    """What a method returns: the chosen answer, every candidate and the costs."""

    method: str
    candidates: list[Candidate]
    best: int
    costs: Costs
    config: dict[str, Any] = field(default_factory=dict)
    requested_method: str | None = None
    """The method asked for, when another one answered: a sampling method at temperature 0 runs greedy
    (``runner.run``)."""

    @property
    def answer(self) -> str:
        return self.candidates[self.best].text

    @property
    def score(self) -> float | None:
        return self.candidates[self.best].score

    def to_dict(self) -> dict[str, Any]:
        """The CLI's ``--json`` object, as plain values."""
        c = self.costs
        return {
            "answer": self.answer,
            "method": self.method,
            "score": self.score,
            "best": self.best,
            "samples": c.samples,
            "batches": c.batches,
            "candidates": [cand.to_dict() for cand in self.candidates],
            "tokens": {
                "generated": c.generated_tokens,
                "prefill": c.prefill_tokens,
                "cached": c.cached_tokens,
            },
            "self_evals": c.self_evals,
            "eval_prefill": c.eval_prefill_tokens,
            "eval_prefill_per_eval": c.eval_prefill_per_eval,
            "critical_path_tokens": c.critical_path_tokens,
            "rm_reads": c.rm_reads,
            "rm_tokens": c.rm_tokens,
            "rm_flops": c.rm_flops,
            "flops": c.flops,
            "wall_s": round(c.wall_s, 3),
            "config": self.config,
            **({"requested_method": self.requested_method} if self.requested_method else {}),
        }

    def to_json(self) -> str:
        """``to_dict()`` as one line of JSON (what ``sgl-adaptive run --json`` prints)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def summary(self) -> str:
        """One line of costs, for humans."""
        c = self.costs
        per_eval = f"{c.eval_prefill_per_eval:.1f}" if c.eval_prefill_per_eval is not None else "-"
        flops = f"{c.flops:.3g}" if c.flops is not None else "n/a"
        score = f"{self.score:.3f}" if self.score is not None else "-"
        rm = f"reward model {c.rm_reads} reads ({c.rm_tokens} tok) | " if c.rm_reads else ""
        method = self.method
        if self.requested_method:
            method += f" (temperature 0: greedy instead of {self.requested_method})"
        return (
            f"{method}: score {score} | samples {c.samples} in {c.batches} batches | "
            f"generated {c.generated_tokens} tok | prefill {c.prefill_tokens} new + {c.cached_tokens} cached | "
            f"self-evals {c.self_evals} ({per_eval} new tok each) | {rm}FLOPs {flops} | {c.wall_s:.1f} s"
        )
