"""An external reward model: a Hugging Face ``AutoModelForSequenceClassification`` (ArmoRM, Skywork-Reward,
or a tiny random one in tests) that reads [user: prompt][assistant: response] with its own chat template.
The reward is ``output.score`` when the model has one (ArmoRM), else the first logit.

One class serves the ``rm`` scorer of the programs (``--scorer rm``), the fine-tuning labels
(``finetune/rewards.py``, ``--reward rm:PATH``) and the bench (``rm-best-of-n``, the judge of general
prompts). Its cost is counted like the policy's, from what it read: the reward model shares no cache with
the policy, so each scored response costs 2 x its body parameters x (prompt + response tokens), plus
attention, plus its score head (``RewardModel.flops``).

How the programs get one: ``MethodConfig.reward_model`` names it by path, so the config stays a plain
serialisable record (it is printed in ``--json`` output and sent to worker threads), and ``shared(path)``
returns the process's one loaded ``RewardModel`` for that path: loaded on first use, then reused by every
program, thread and request (scoring is serialised by a lock). The command line calls ``shared`` before the
method runs, with its ``--device``, so a bad path fails early and the device is chosen there.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

from sgl_adaptive.conversation import Prompt, as_conversation
from sgl_adaptive.costs import ModelShape, request_flops
from sgl_adaptive.errors import UserError
from sgl_adaptive.weights import check_finite


@dataclasses.dataclass(frozen=True)
class RewardScores:
    scores: list[float]
    tokens: list[int]
    """Tokens the reward model read for each response (prompt + response, with its chat template)."""
    flops: list[float]


def check_path(path: str) -> None:
    """Fail before torch is imported on a path that is neither a Hugging Face model folder nor shaped like
    a hub name (``org/name``)."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"reward model {path!r} has no config.json (not a Hugging Face model folder)")
        return
    if path.count("/") != 1 or path.startswith(("/", ".", "~")):
        raise UserError(f"reward model not found: {path}")


class RewardModel:
    """Scores (prompt, response) pairs; thread-safe (one forward at a time)."""

    def __init__(
        self,
        path: str,
        device: str | None = None,
        *,
        batch_size: int = 8,
        max_length: int = 4096,
        trust_remote_code: bool = False,
    ) -> None:
        check_path(path)
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = path
        self.name = Path(path.rstrip("/")).name or path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load the reward model {path!r}: {first}") from None
        check_finite(self.model, f"reward model {path!r}")  # NaN rewards would pick at random
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # positions of a padded row equal its solo run's
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        shape = ModelShape.from_model(self.model)
        # the score head replaces the LM head: hidden x num_labels per sequence
        self.shape = dataclasses.replace(shape, vocab=int(self.model.config.num_labels or 1))
        self.batch_size, self.max_length = batch_size, max_length
        self._lock = threading.Lock()

    def render(self, prompt: Prompt, response: str) -> str:
        """The text the reward model reads (the prompt or the whole conversation, then the response): its
        chat template when it has one."""
        turns = [m.to_dict() for m in as_conversation(prompt)]
        if getattr(self.tokenizer, "chat_template", None):
            messages = [*turns, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return (
            "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in turns) + f"Assistant: {response}"
        )

    def score(self, prompt: Prompt, responses: Sequence[str]) -> RewardScores:
        """The reward of each response to ``prompt`` (finished or not), with what reading it cost."""
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
                    max_length=self.max_length,
                    add_special_tokens=False,
                ).to(self.device)
                result = self.model(**batch)
                values = getattr(result, "score", None)
                rows = len(batch["input_ids"])
                values = result.logits[:, 0] if values is None else values.reshape(rows, -1)[:, 0]
                scores += [float(x) for x in values.float().cpu()]
                tokens += [int(x) for x in batch["attention_mask"].sum(dim=1).cpu()]
        return RewardScores(scores, tokens, [self.flops(t) for t in tokens])

    def flops(self, tokens: int) -> float:
        """One full read of ``tokens`` tokens (nothing cached), with the score head."""
        return request_flops(self.shape, tokens, 0, 0)


_SHARED: dict[str, RewardModel] = {}
_SHARED_LOCK = threading.Lock()


def _key(path: str) -> str:
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def shared(path: str, device: str | None = None) -> RewardModel:
    """The process's reward model for ``path``, loaded on the first call (on ``device``; later calls get
    the same object whatever their ``device``). Two spellings of one local folder share it."""
    with _SHARED_LOCK:
        key = _key(path)
        model = _SHARED.get(key)
        if model is None:
            model = _SHARED[key] = RewardModel(path, device)
        return model
