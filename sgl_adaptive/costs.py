"""Cost accounting: what a program spent, identical in meaning on every backend.

Every request's ``meta_info`` (SGLang server or in-process backend) carries ``prompt_tokens``,
``cached_tokens`` (prompt tokens whose KV came from the prefix cache) and ``completion_tokens``.
Programs record each request here as a sample request or an evaluation (self-evaluation or judge); the
totals and the FLOPs estimate are derived from those records. An external reward model's reads (the ``rm``
scorer) are recorded apart, with the FLOPs the reward model computed them from (``record_rm``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RequestKind = Literal["prompt", "sample", "eval"]


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs estimate needs to know about a decoder-only transformer."""

    n_layers: int
    hidden: int
    attn_dim: int
    """Query heads x head dim."""
    vocab: int
    body_params: int
    """Parameters other than the input embedding and the output head."""

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Estimate from a Hugging Face config (dense decoder: attention + gated MLP per layer)."""
        cfg = getattr(config, "text_config", None) or config
        hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
        attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
        mlp = 3 * hidden * inter
        return cls(layers, hidden, heads * head_dim, cfg.vocab_size, layers * (attn + mlp))

    @classmethod
    def from_model(cls, model: Any) -> ModelShape:
        """Exact body parameter count from a loaded model; the rest from its config."""
        shape = cls.from_config(model.config)
        skip = {id(model.get_input_embeddings().weight)}
        head = model.get_output_embeddings()
        if head is not None:
            skip.add(id(head.weight))
        body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
        return cls(shape.n_layers, shape.hidden, shape.attn_dim, shape.vocab, body)


def _position_sum(start: int, stop: int) -> int:
    """Sum of attended key counts (position + 1) for positions start .. stop-1."""
    return (stop * (stop + 1) - start * (start + 1)) // 2


def request_flops(shape: ModelShape, prompt: int, cached: int, completion: int) -> float:
    """Forward FLOPs of one request.

    2 x body params per processed token (new prompt tokens + decoded tokens; the last generated
    token is never fed back, the first is produced by the prefill), plus attention
    (QK^T and AV: 4 x layers x attended keys x attention width per token), plus the output head
    (2 x hidden x vocab) once per produced token (at least once, for the prefill's logits).
    """
    fed_prompt = max(prompt - cached, 0)
    fed_decode = max(completion - 1, 0)
    tokens = fed_prompt + fed_decode
    attention = (
        4
        * shape.n_layers
        * shape.attn_dim
        * (_position_sum(cached, prompt) + _position_sum(prompt, prompt + fed_decode))
    )
    head = 2 * shape.hidden * shape.vocab * max(completion, 1)
    return float(2 * shape.body_params * tokens + attention + head)


@dataclass(frozen=True)
class RequestRecord:
    kind: RequestKind
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @property
    def new_prefill(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Costs:
    """Totals of one program run (the result's cost fields)."""

    samples: int = 0
    """Samples started (pruned ones included)."""
    batches: int = 0
    """Sequential sampling rounds: the latency proxy."""
    generated_tokens: int = 0
    prefill_tokens: int = 0
    """New (not cached) prompt tokens processed, samples and evaluations together."""
    cached_tokens: int = 0
    self_evals: int = 0
    eval_prefill_tokens: int = 0
    """New prompt tokens of the self-evaluation requests (ideally just the evaluation turn)."""
    critical_path_tokens: int = 0
    """Tokens decoded on the longest sequential chain (sum over rounds of the longest sample)."""
    rm_reads: int = 0
    """Responses (or partial responses) an external reward model read (the ``rm`` scorer)."""
    rm_tokens: int = 0
    """Tokens the reward model read: each read is the prompt and the response in full, with the reward
    model's chat template (it shares no cache with the policy)."""
    rm_flops: float = 0.0
    """The reward model's forward FLOPs over those reads (included in ``flops``)."""
    flops: float | None = None
    """The policy's FLOPs (None when its shape is unknown) plus ``rm_flops``."""
    wall_s: float = 0.0

    @property
    def eval_prefill_per_eval(self) -> float | None:
        return self.eval_prefill_tokens / self.self_evals if self.self_evals else None


@dataclass
class CostMeter:
    """Collects request records while a program runs (thread-safe)."""

    records: list[RequestRecord] = field(default_factory=list)
    samples: int = 0
    batches: int = 0
    critical_path_tokens: int = 0
    rm_reads: int = 0
    rm_tokens: int = 0
    rm_flops: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, kind: RequestKind, meta_info: Mapping[str, Any]) -> RequestRecord:
        rec = RequestRecord(
            kind=kind,
            prompt_tokens=int(meta_info.get("prompt_tokens", 0)),
            cached_tokens=int(meta_info.get("cached_tokens", 0) or 0),
            completion_tokens=int(meta_info.get("completion_tokens", 0)),
        )
        with self._lock:
            self.records.append(rec)
        return rec

    def start_round(self, samples: int) -> None:
        """A new sequential batch of ``samples`` samples begins."""
        with self._lock:
            self.samples += samples
            self.batches += 1

    def add_critical_path(self, tokens: int) -> None:
        with self._lock:
            self.critical_path_tokens += tokens

    def record_rm(self, tokens: int, flops: float) -> None:
        """One read of an external reward model: ``tokens`` read, ``flops`` spent."""
        with self._lock:
            self.rm_reads += 1
            self.rm_tokens += tokens
            self.rm_flops += flops

    def totals(self, shape: ModelShape | None = None, wall_s: float = 0.0) -> Costs:
        evals = [r for r in self.records if r.kind == "eval"]
        flops = None
        if shape is not None:
            flops = self.rm_flops + sum(
                request_flops(shape, r.prompt_tokens, r.cached_tokens, r.completion_tokens)
                for r in self.records
            )
        return Costs(
            samples=self.samples,
            batches=self.batches,
            generated_tokens=sum(r.completion_tokens for r in self.records if r.kind == "sample"),
            prefill_tokens=sum(r.new_prefill for r in self.records),
            cached_tokens=sum(r.cached_tokens for r in self.records),
            self_evals=len(evals),
            eval_prefill_tokens=sum(r.new_prefill for r in evals),
            critical_path_tokens=self.critical_path_tokens,
            rm_reads=self.rm_reads,
            rm_tokens=self.rm_tokens,
            rm_flops=self.rm_flops,
            flops=flops,
            wall_s=wall_s,
        )
