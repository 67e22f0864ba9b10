"""An external Hugging Face reward model (``AutoModelForSequenceClassification``, one logit).

Used by ``rm-best-of-n`` (the paper's main baseline) and as the judge of general prompts. Its cost
is accounted like the policy's: the reward model re-reads the prompt and every response, so each
scored response costs 2 x its body parameters x tokens read, plus attention, plus its score head.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

from sgl_adaptive.costs import ModelShape, request_flops
from sgl_adaptive.errors import UserError


@dataclasses.dataclass(frozen=True)
class RewardScores:
    scores: list[float]
    tokens: list[int]
    """Tokens the reward model read for each response (prompt + response, with its chat template)."""
    flops: list[float]


class RewardModel:
    """Scores (prompt, response) pairs; thread-safe (one forward at a time)."""

    def __init__(self, path: str, device: str | None = None, batch_size: int = 8) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).expanduser().exists() and "/" not in path:
            raise UserError(f"reward model not found: {path}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load reward model {path!r}: {first}") from None
        self.device = device or "cpu"
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.name = Path(path.rstrip("/")).name or path
        shape = ModelShape.from_model(self.model)
        # the score head replaces the LM head: hidden x num_labels per sequence
        self.shape = dataclasses.replace(shape, vocab=int(self.model.config.num_labels or 1))
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def render(self, prompt: str, response: str) -> str:
        """The text the reward model reads: its chat template when it has one."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{prompt}\n\n{response}"

    def score(self, prompt: str, responses: list[str]) -> RewardScores:
        import torch

        texts = [self.render(prompt, r) for r in responses]
        scores: list[float] = []
        tokens: list[int] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    add_special_tokens=False,
                ).to(self.device)
                logits = self.model(**batch).logits
                scores += [float(x) for x in logits[:, 0].float().cpu()]
                tokens += [int(x) for x in batch["attention_mask"].sum(dim=1).cpu()]
        return RewardScores(scores, tokens, [self.flops(t) for t in tokens])

    def flops(self, tokens: int) -> float:
        """One full read of ``tokens`` tokens (nothing cached), with the one-logit score head."""
        return request_flops(self.shape, tokens, 0, 0)


def preference(reward: float, reference_reward: float) -> float:
    """Pairwise preference of a response over the reference output: 1 win, 0.5 tie, 0 loss."""
    if reward > reference_reward:
        return 1.0
    return 0.5 if reward == reference_reward else 0.0


def make_judge(rm: RewardModel) -> Any:
    """A ``datasets.Judge``: the reward, or the win against the item's reference output when it has one."""
    cache: dict[str, float] = {}

    def judge(item: Any, responses: list[str]) -> list[float]:
        rewards = rm.score(item.prompt, responses).scores
        if item.reference is None:
            return rewards
        if item.qid not in cache:
            cache[item.qid] = rm.score(item.prompt, [item.reference]).scores[0]
        return [preference(r, cache[item.qid]) for r in rewards]

    return judge
