"""Reward sources for labelling: a verifier (GSM8K numbers, MATH via math-verify) or a Hugging Face
reward model (``sgl_adaptive.reward_model``: ArmoRM, Skywork-Reward, or a tiny one in tests).

A reward is any callable ``(item, responses) -> rewards`` with a ``name`` and a ``verifier`` flag
(0/1 rewards get the verifier tie margin); tests inject their own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sgl_adaptive.answers import check_math, extract_number, numbers_equal
from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.prompts import PromptItem


class Reward(Protocol):
    name: str
    verifier: bool

    def __call__(self, item: PromptItem, responses: Sequence[str]) -> list[float]: ...


class FunctionReward:
    """Wrap a plain function ``(item, response) -> float`` (synthetic tasks, tests)."""

    def __init__(self, fn: Callable[[PromptItem, str], float], name: str, verifier: bool = True) -> None:
        self.fn, self.name, self.verifier = fn, name, verifier

    def __call__(self, item: PromptItem, responses: Sequence[str]) -> list[float]:
        return [float(self.fn(item, r)) for r in responses]


class VerifierReward:
    """1.0 for a correct final answer, 0.0 otherwise: GSM8K numbers, MATH expressions (math-verify)."""

    name = "verifier"
    verifier = True

    def check(self, items: Sequence[PromptItem]) -> None:
        """Fail before any sampling when a prompt has nothing to verify against."""
        for item in items:
            if item.reference is None:
                raise UserError(
                    f"prompt {item.id} has no reference answer: the verifier needs GSM8K- or MATH-style "
                    "records (use --reward rm:PATH for open-ended prompts)"
                )

    def __call__(self, item: PromptItem, responses: Sequence[str]) -> list[float]:
        self.check([item])
        if item.kind == "math":
            return [float(check_math(r, item.reference)) for r in responses]
        return [float(numbers_equal(extract_number(r), item.reference)) for r in responses]


class RegexReward:
    """1.0 when the response matches a regular expression (format checks; synthetic tasks in tests)."""

    verifier = True

    def __init__(self, pattern: str) -> None:
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise UserError(f"bad --reward regex {pattern!r}: {exc}") from None
        self.name = f"regex:{pattern}"

    def __call__(self, item: PromptItem, responses: Sequence[str]) -> list[float]:
        return [float(self.pattern.search(r) is not None) for r in responses]


class ModelReward:
    """A reward model (``sgl_adaptive.reward_model.RewardModel``) as a labelling reward (``rm:PATH``)."""

    verifier = False

    def __init__(self, path: str, *, device: str | None = None, trust_remote_code: bool = False) -> None:
        from sgl_adaptive.reward_model import RewardModel

        self.name = f"rm:{path}"
        self.model = RewardModel(path, device, trust_remote_code=trust_remote_code)

    def __call__(self, item: PromptItem, responses: Sequence[str]) -> list[float]:
        return self.model.score(item.prompt, responses).scores


def reward_from_spec(spec: str, *, device: str | None = None, trust_remote_code: bool = False) -> Any:
    """``verifier``, ``regex:PATTERN`` or ``rm:PATH`` (a local directory or a hub name)."""
    if spec == "verifier":
        return VerifierReward()
    if spec.startswith("regex:") and spec[6:]:
        return RegexReward(spec[6:])
    if spec.startswith("rm:") and spec[3:].strip():
        return ModelReward(spec[3:].strip(), device=device, trust_remote_code=trust_remote_code)
    raise UserError(f"unknown reward {spec!r}: use 'verifier', 'regex:PATTERN' or 'rm:PATH'")
