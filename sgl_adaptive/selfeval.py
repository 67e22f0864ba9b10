"""Capability-aware self-evaluation: the prompt and the score.

After a (possibly unfinished) response the model is asked, as a new user turn,
``Would you do better if you started over? ("Yes." or "No.")``. The score is
P("No") / (P("Yes") + P("No")) read from the next-token distribution of the
opened assistant turn: the model's estimate that a fresh sample would not be
significantly better (P(win or tie)). The turn itself is built by the programs
through the chat template (``programs/common.py``); this module holds the words,
the token variants and the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sgl_adaptive.errors import UserError

DEFAULT_EVAL_PROMPT = 'Would you do better if you started over? ("Yes." or "No.")'


@dataclass(frozen=True)
class SelfEvalConfig:
    """What is asked and which answer words are read."""

    prompt: str = DEFAULT_EVAL_PROMPT
    """The user turn appended after the response."""
    keep_word: str = "No"
    """The answer meaning "I would not do better": its probability is the score."""
    retry_word: str = "Yes"
    """The answer meaning "a fresh sample would be better"."""
    top_logprobs_num: int = 20
    """Top-k logprobs requested as a fallback when a backend cannot return the two ids exactly."""

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("the self-evaluation prompt is empty")
        if normalize_answer(self.keep_word) == normalize_answer(self.retry_word):
            raise ValueError("keep_word and retry_word must differ")


@dataclass(frozen=True)
class SelfEvalScore:
    """One evaluation: the renormalised score and the raw answer masses."""

    score: float
    p_keep: float
    p_retry: float

    @property
    def answer_mass(self) -> float:
        """Share of the next-token mass on the two answers (the untrained model's prior check)."""
        return self.p_keep + self.p_retry


class NoAnswerTokenError(UserError, ValueError):
    """The tokenizer spells an answer word only with several tokens, so its probability cannot be read."""


def normalize_answer(token_text: str) -> str:
    """Case-, space- and period-insensitive form of an answer token (`" No."` -> `"no"`)."""
    return token_text.strip().rstrip(".").strip().lower()


def answer_variants(word: str) -> list[str]:
    """Spellings a tokenizer may use for one answer word: case and leading-space variants."""
    forms = {word, word.lower(), word.capitalize(), word.upper()}
    return sorted({prefix + form for form in forms for prefix in ("", " ")})


def answer_token_ids(tokenizer: Any, config: SelfEvalConfig) -> dict[int, str]:
    """Single-token ids of every variant of both answer words, mapped to their normalised word."""
    ids: dict[int, str] = {}
    for word in (config.keep_word, config.retry_word):
        for variant in answer_variants(word):
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1:
                ids[encoded[0]] = normalize_answer(word)
    found = set(ids.values())
    missing = [w for w in (config.retry_word, config.keep_word) if normalize_answer(w) not in found]
    if missing:
        words = " or ".join(repr(w) for w in missing)
        raise NoAnswerTokenError(
            f"this model's tokenizer has no single-token {words}: the self-evaluation score reads "
            f"P({config.keep_word!r}) and P({config.retry_word!r}) from one next-token distribution, so "
            "use a model whose tokenizer has both words as single tokens"
        )
    return ids


def score_from_logprobs(entries: Iterable[Sequence[Any]], config: SelfEvalConfig) -> SelfEvalScore:
    """Score from ``(logprob, token_id, token_text)`` entries (SGLang's logprob shape).

    Variants of a word are summed; a token listed twice counts once. A word absent from the
    entries has probability 0; when both are absent the score is 0.5 (no information).
    """
    keep, retry = normalize_answer(config.keep_word), normalize_answer(config.retry_word)
    seen: set[Any] = set()
    p_keep = p_retry = 0.0
    for entry in entries:
        logprob, token_id, text = entry[0], entry[1], entry[2] if len(entry) > 2 else None
        key = token_id if token_id is not None else text
        if key in seen or text is None or logprob is None:
            continue
        seen.add(key)
        word = normalize_answer(text)
        if word == keep:
            p_keep += math.exp(logprob)
        elif word == retry:
            p_retry += math.exp(logprob)
    total = p_keep + p_retry
    score = p_keep / total if total > 0 else 0.5
    return SelfEvalScore(score=score, p_keep=p_keep, p_retry=p_retry)


def score_from_meta_info(meta_info: Mapping[str, Any], config: SelfEvalConfig) -> SelfEvalScore:
    """Score from the meta_info of a one-token evaluation request.

    Uses ``output_token_ids_logprobs`` (exact, asked for by our backends) when present,
    otherwise the ``output_top_logprobs`` of the first output position.
    """
    for key in ("output_token_ids_logprobs", "output_top_logprobs"):
        per_position = meta_info.get(key)
        if per_position and per_position[0]:
            return score_from_logprobs(per_position[0], config)
    raise ValueError("the evaluation response carries no logprobs (was return_logprob set?)")
