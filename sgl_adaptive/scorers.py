"""Scorers: how a sample's score is computed (the score every selector, stop rule and pruning rank reads).

- ``self-eval`` (default): the model is asked whether it would do better, in a side branch after the
  response; the score is P(keep) from the answer tokens' log-probabilities (``selfeval.py``).
  One evaluation request per scored sample (metered as ``Costs.self_evals``).
- ``judge``: the zero-shot LLM-as-a-judge, the paper's Table 1 baseline: the same side-branch request, but
  the policy is asked ``Is the answer above correct? ("Yes." or "No.")`` (``judge_prompt``) and the score
  is P("Yes") / (P("Yes") + P("No")) (``judge_config``). Counted as evaluations too.
- ``confidence``: DeepConf's lowest group confidence (Fu et al. 2025, "Deep Think with Confidence",
  arXiv:2508.15260), from the per-token top-k log-probabilities of the sample's own generated tokens.
- ``self-certainty``: Kang et al. 2025, "Scalable Best-of-N Selection for Large Language
  Models via Self-Certainty"
  (arXiv:2502.18581), from the same top-k log-probabilities.
- ``rm``: an external reward model (``reward_model.py``, a Hugging Face sequence-classification model)
  reads the prompt and the response so far; the score is its logit. It runs in this process whatever the
  backend, and its reads are metered apart (``Costs.rm_reads``, ``rm_tokens``, ``rm_flops``).

The two training-free scorers send no request: the top-k log-probabilities come back with the sample's
own generation (``return_logprob`` / ``top_logprobs_num``), computed from the logits the decode step
produces anyway, so they cost no extra forward pass (nothing is added to ``Costs``).

Formulas, for a sample of T generated tokens where token t has top-k log-probabilities
l_{t,1} .. l_{t,k} (the k most likely next tokens at that position, of the model's distribution at
temperature 1; a log-probability below ``LOGPROB_FLOOR``, an underflowed probability, counts as the floor):

- token confidence (DeepConf eq. 2): C_t = -(1/k) * sum_j l_{t,j};
- confidence score: the lowest sliding-window mean of C_t over windows of w = ``window`` consecutive
  tokens, min_{s = 1 .. T-w+1} (1/w) * sum_{t=s}^{s+w-1} C_t; the mean of all C_t when T < w
  (DeepConf's "lowest group confidence", w = 2048 in the paper; 64 here for short GSM8K answers);
- self-certainty: the mean over tokens of KL(U || p) with the vocabulary cut to the top k,
  (1/T) * sum_t [ sum_j (1/k) * log((1/k) / p_{t,j}) ] = (1/T) * sum_t (C_t - log k).
  (The paper's KL runs over the whole vocabulary, which the top-k cannot give; on the top-k it is the
  mean token confidence shifted by log k, so it ranks samples like DeepConf's mean trace confidence.)

Higher is more confident for both, and both are comparable within a pool (same model, same k); they are
not probabilities, and neither is a reward model's logit. So no threshold is calibrated for them: a
threshold stop refuses them (``MethodConfig``; only ``CALIBRATED`` scorers, probabilities in [0, 1], pass);
the softmax weights of ``weighted-majority`` read them on their own scale (tune ``vote_temperature``).
A sample with no generated token has no score (None).

The log-probabilities must be of the model's own distribution (temperature 1): the in-process backend
returns those; an SGLang server returns the temperature-scaled ones of sampled tokens unless it runs with
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (see README, Methods).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from sgl_adaptive.rules import check_name
from sgl_adaptive.selfeval import SelfEvalConfig

SCORERS: tuple[str, ...] = ("self-eval", "confidence", "self-certainty", "rm", "judge")
EVALUATED: tuple[str, ...] = ("self-eval", "judge")
"""Scorers that ask the policy a question in a side branch: one evaluation request per score."""
TRAINING_FREE: tuple[str, ...] = ("confidence", "self-certainty")
"""Scorers computed from the sample's own top-k log-probabilities (no evaluation request)."""
CALIBRATED: tuple[str, ...] = ("self-eval", "judge")
"""Scorers whose score is a probability in [0, 1], so that a fixed threshold means something."""
REWARD_MODEL = "rm"
"""The scorer that reads the response with an external reward model."""
LOGPROB_FLOOR = -100.0
"""Log-probabilities are clamped from below here: an SGLang server reports an underflowed probability as
the float minimum (about -3.4e38), which would swamp every mean."""

TopLogprobs: TypeAlias = Sequence[Sequence[Sequence[Any]]]
"""Per generated token, its top-k entries ``(logprob, token_id, text)`` (``meta_info["output_top_logprobs"]``)."""


DEFAULT_JUDGE_PROMPT = 'Is the answer above correct? ("Yes." or "No.")'
"""The zero-shot judge's question (the ``judge`` scorer; ``--judge-prompt``)."""


def judge_config(prompt: str = DEFAULT_JUDGE_PROMPT) -> SelfEvalConfig:
    """The zero-shot judge as an evaluation request: ``prompt`` asked after the response, the score is
    P("Yes") / (P("Yes") + P("No")) (the self-evaluation's answer words, read the other way round, so the
    backends' exact answer-token log-probabilities serve it unchanged)."""
    return SelfEvalConfig(prompt=prompt, keep_word="Yes", retry_word="No")


def token_confidences(top_logprobs: TopLogprobs) -> list[float]:
    """C_t = -mean of the token's top-k log-probabilities, per generated token (a token without entries is
    skipped)."""
    confidences = []
    for entries in top_logprobs:
        values = [max(float(e[0]), LOGPROB_FLOOR) for e in entries if e and e[0] is not None]
        if values:
            confidences.append(-sum(values) / len(values))
    return confidences


def lowest_window_mean(values: Sequence[float], window: int) -> float | None:
    """The lowest mean of ``window`` consecutive values (the mean of all if fewer); None if empty."""
    if not values:
        return None
    if len(values) <= window:
        return sum(values) / len(values)
    total = sum(values[:window])
    lowest = total
    for t in range(window, len(values)):
        total += values[t] - values[t - window]
        lowest = min(lowest, total)
    return lowest / window


def confidence_score(top_logprobs: TopLogprobs, window: int) -> float | None:
    """DeepConf's lowest group confidence of a sample (see the module docstring)."""
    return lowest_window_mean(token_confidences(top_logprobs), window)


def self_certainty_score(top_logprobs: TopLogprobs) -> float | None:
    """The mean over tokens of KL(uniform over the top k || p) (see the module docstring)."""
    kls = []
    for entries in top_logprobs:
        values = [max(float(e[0]), LOGPROB_FLOOR) for e in entries if e and e[0] is not None]
        if values:
            kls.append(-sum(values) / len(values) - math.log(len(values)))
    return sum(kls) / len(kls) if kls else None


@dataclass(frozen=True)
class Scorer:
    """The configured scorer (``MethodConfig.scorer_rule()``)."""

    kind: str = "self-eval"
    window: int = 64
    """confidence: tokens per sliding window."""
    top_k: int = 20
    """Training-free scorers: top log-probabilities asked for per generated token."""

    def __post_init__(self) -> None:
        check_name("scorer", self.kind, SCORERS)
        if self.window < 1:
            raise ValueError(f"the confidence window must be at least 1 token (got {self.window})")
        if self.top_k < 1:
            raise ValueError(f"the scorer's top-k must be at least 1 (got {self.top_k})")

    @property
    def training_free(self) -> bool:
        """Scored from the sample's own top-k log-probabilities, with no evaluation request."""
        return self.kind in TRAINING_FREE

    @property
    def evaluated(self) -> bool:
        """Scored by an evaluation request in a side branch (self-eval, judge)."""
        return self.kind in EVALUATED

    @property
    def calibrated(self) -> bool:
        """The score is a probability in [0, 1] (a threshold stop may read it)."""
        return self.kind in CALIBRATED

    def score(self, top_logprobs: TopLogprobs) -> float | None:
        """A training-free scorer's score of a sample (prefix) from its tokens' top-k log-probabilities."""
        if self.kind == "confidence":
            return confidence_score(top_logprobs, self.window)
        if self.kind == "self-certainty":
            return self_certainty_score(top_logprobs)
        raise ValueError(f"the {self.kind} score does not come from the sample's log-probabilities")
