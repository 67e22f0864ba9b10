"""Training examples: one per response and per token budget (mid-generation prefixes carry the label
of the full response), and the answer token each one is trained to produce."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sgl_adaptive.finetune.labels import KEEP_LABEL, RETRY_LABEL, PairwiseLabel
from sgl_adaptive.selfeval import SelfEvalConfig, answer_token_ids, normalize_answer

DEFAULT_BUDGETS: tuple[int, ...] = (16, 32, 64, 128, 256)
"""The paper's truncation budgets (tokens); every response is also used in full."""


def truncate_response(tokenizer: Any, text: str, budget: int, ids: Sequence[int] | None = None) -> str | None:
    """The first ``budget`` tokens of ``text`` as text, or None when it has no more than ``budget``.

    A cut inside a multi-byte character would decode to a replacement character: the cut moves back
    (at most 3 tokens) to the longest prefix that is exactly a prefix of ``text``, else gives "".
    ``ids``: the encoding of ``text``, when the caller has it."""
    ids = tokenizer.encode(text, add_special_tokens=False) if ids is None else ids
    if len(ids) <= budget:
        return None
    for cut in range(budget, max(budget - 4, 0), -1):
        prefix = tokenizer.decode(ids[:cut], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.startswith(prefix):
            return prefix
    return ""


def parse_budgets(spec: str | Sequence[int]) -> tuple[int, ...]:
    """``"16,64,128"`` (or a sequence) -> sorted unique positive budgets; ``""``/``"none"`` -> none."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip() and p.strip().lower() != "none"]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"token budgets must be integers, e.g. 16,64,128 (got {spec!r})") from None
    else:
        values = list(spec)
    if any(v < 1 for v in values):
        raise ValueError(f"token budgets must be positive (got {spec!r})")
    return tuple(sorted(set(values)))


def make_examples(
    record: dict[str, Any],
    labels: Sequence[PairwiseLabel],
    budgets: Sequence[int],
    tokenizer: Any,
    provenance: dict[str, Any],
) -> list[dict[str, Any]]:
    """Examples of one prompt's samples: each full response, then its prefixes at each budget it exceeds."""
    out = []
    for sample, lab in zip(record["samples"], labels, strict=True):
        base = {
            "prompt_id": record["id"],
            "sample": sample["index"],
            "seed": record["seed"],
            "prompt": record["prompt"],
            "response": sample["text"],
            "response_tokens": sample["tokens"],
            "finished": sample["finished"],
            "reward": sample["reward"],
            "label": lab.label,
            "wins": lab.wins,
            "ties": lab.ties,
            "losses": lab.losses,
            "soft_no": lab.soft_no,
            "provenance": provenance,
        }
        out.append({**base, "text": sample["text"], "truncated_tokens": None})
        ids = tokenizer.encode(sample["text"], add_special_tokens=False) if budgets else []
        for budget in budgets:
            prefix = truncate_response(tokenizer, sample["text"], budget, ids)
            if prefix:
                out.append({**base, "text": prefix, "truncated_tokens": budget})
    return out


def answer_targets(tokenizer: Any, selfeval: SelfEvalConfig | None = None) -> dict[str, int]:
    """Token id the model is trained to emit for "No" and for "Yes": the word's own single-token spelling
    (no leading space: what an assistant turn starts with), else the first single-token variant."""
    selfeval = selfeval or SelfEvalConfig()
    variants = answer_token_ids(tokenizer, selfeval)
    targets = {}
    for label, word in ((KEEP_LABEL, selfeval.keep_word), (RETRY_LABEL, selfeval.retry_word)):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) == 1:
            targets[label] = ids[0]
        else:
            targets[label] = min(i for i, w in variants.items() if w == normalize_answer(word))
    return targets
