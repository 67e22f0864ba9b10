"""Reward sources for labelling: a verifier (GSM8K numbers, MATH via math-verify) or a Hugging Face
reward model (``AutoModelForSequenceClassification``: ArmoRM, Skywork-Reward, or a tiny one in tests).

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


class RewardModel:
    """A sequence-classification reward model scoring [user: prompt][assistant: response] with its own
    chat template; the reward is ``output.score`` when the model has one (ArmoRM) else ``logits[:, 0]``."""

    verifier = False

    def __init__(
        self,
        path: str,
        *,
        device: str | None = None,
        batch_size: int = 8,
        max_length: int = 4096,
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = f"rm:{path}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot load the reward model {path!r}: {str(exc).strip().splitlines()[0]}"
            ) from exc
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    def _text(self, prompt: str, response: str) -> str:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"User: {prompt}\nAssistant: {response}"

    def __call__(self, item: PromptItem, responses: Sequence[str]) -> list[float]:
        import torch

        out: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            texts = [self._text(item.prompt, r) for r in responses[start : start + self.batch_size]]
            batch = self.tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(self.device)
            with torch.no_grad():
                result = self.model(**batch)
            scores = getattr(result, "score", None)
            scores = result.logits[:, 0] if scores is None else scores.reshape(len(texts), -1)[:, 0]
            out.extend(float(s) for s in scores.float().cpu())
        return out


def reward_from_spec(spec: str, *, device: str | None = None, trust_remote_code: bool = False) -> Any:
    """``verifier``, ``regex:PATTERN`` or ``rm:PATH`` (a local directory or a hub name)."""
    if spec == "verifier":
        return VerifierReward()
    if spec.startswith("regex:") and spec[6:]:
        return RegexReward(spec[6:])
    if spec.startswith("rm:") and spec[3:].strip():
        return RewardModel(spec[3:].strip(), device=device, trust_remote_code=trust_remote_code)
    raise UserError(f"unknown reward {spec!r}: use 'verifier', 'regex:PATTERN' or 'rm:PATH'")
