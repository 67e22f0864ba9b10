"""Batched self-evaluation scores straight from a causal LM's logits, on exactly the text the programs
send (``render_selfeval_prompt``): P(No) / (P(Yes) + P(No)) summed over the answer variants, the answer
mass, and the one-token loss. Also loads a model directory, a hub name or a LoRA adapter directory."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgl_adaptive.backends.precision import ExactHead
from sgl_adaptive.chat_template import derive_chat_template, render_selfeval_prompt
from sgl_adaptive.errors import ModelNotFoundError, ProgramError
from sgl_adaptive.finetune.batching import HeadGather, right_pad
from sgl_adaptive.finetune.examples import answer_targets
from sgl_adaptive.finetune.labels import KEEP_LABEL, RETRY_LABEL
from sgl_adaptive.selfeval import SelfEvalConfig, answer_token_ids, normalize_answer
from sgl_adaptive.weights import check_finite


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal_lm(path: str, *, device: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of an HF directory/hub name, or of a PEFT adapter directory merged into its base.
    fp32 on CPU, bf16 on a GPU unless ``dtype`` is given. Non-finite weights are a one-line error."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    adapter = Path(path) / "adapter_config.json"
    try:
        if adapter.is_file():
            from peft import PeftModel

            base = json.loads(adapter.read_text())["base_model_name_or_path"]
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
            tok_path = path if (Path(path) / "tokenizer_config.json").is_file() else base
            tokenizer = AutoTokenizer.from_pretrained(tok_path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"cannot load model {path!r}: {first}") from exc
    check_finite(model, f"model {path!r}")
    return model.to(device).eval(), tokenizer


@dataclass(frozen=True)
class ExampleScore:
    score: float
    """P(No) / (P(Yes) + P(No)), variants summed."""
    p_no: float
    p_yes: float
    loss: float
    """-log P(target answer token) for the example's hard label (nan without a label)."""


class SelfEvalEncoder:
    """Token ids of self-evaluation examples for one tokenizer: the prompt the programs send, and the
    answer token to train on."""

    def __init__(self, tokenizer: Any, selfeval: SelfEvalConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.selfeval = selfeval or SelfEvalConfig()
        self.template = derive_chat_template(tokenizer)
        self.targets = answer_targets(tokenizer, self.selfeval)
        variants = answer_token_ids(tokenizer, self.selfeval)
        keep = normalize_answer(self.selfeval.keep_word)
        self.keep_ids = sorted(i for i, w in variants.items() if w == keep)
        self.retry_ids = sorted(i for i, w in variants.items() if w != keep)

    def prompt_ids(self, prompt: str, text: str) -> list[int]:
        rendered = render_selfeval_prompt(self.template, prompt, text, self.selfeval.prompt)
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def prompt_ids_and_response(self, prompt: str, text: str) -> tuple[list[int], int, int]:
        """``prompt_ids`` and the token range [start, end) of the response inside them (for the KL
        guard and drift: those positions are the policy's own generation)."""
        rendered = render_selfeval_prompt(self.template, prompt, text, self.selfeval.prompt)
        char_start = render_selfeval_prompt(self.template, prompt, "\x00", self.selfeval.prompt).index("\x00")
        enc = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        char_end = char_start + len(text)
        inside = [
            i for i, (a, b) in enumerate(enc["offset_mapping"]) if a >= char_start and b <= char_end and b > a
        ]
        start, end = (inside[0], inside[-1] + 1) if inside else (0, 0)
        return list(enc["input_ids"]), start, end

    def target_id(self, label: str) -> int:
        return self.targets[label]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids), left-padded so every row ends at the last column;
    positions count real tokens only, so a padded row computes what it would alone. For one row (the
    drift measure) there is no padding; batches use ``batching.right_pad`` (no mask, no masked rows)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _batches(order: list[int], lengths: list[int], max_tokens: int, max_rows: int) -> Iterator[list[int]]:
    batch: list[int] = []
    for i in order:
        if batch and (
            (len(batch) + 1) * max(lengths[j] for j in [*batch, i]) > max_tokens or len(batch) >= max_rows
        ):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def score_examples(
    model: Any,
    encoder: SelfEvalEncoder,
    examples: Sequence[dict[str, Any]],
    *,
    batch_tokens: int = 8192,
    max_rows: int = 32,
    on_batch: Any = None,
) -> list[ExampleScore]:
    """Scores of ``examples`` (``prompt``, ``text``, optional ``label``), batched by length (right-padded,
    no attention mask: see ``batching``). A non-finite score is an error, never a silent 0.5."""
    import torch

    encoded = [encoder.prompt_ids(ex["prompt"], ex["text"]) for ex in examples]
    lengths = [len(e) for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: lengths[i])
    pad = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: list[ExampleScore | None] = [None] * len(encoded)
    with HeadGather(model) as gather, ExactHead(model) as exact:
        for batch in _batches(order, lengths, batch_tokens, max_rows):
            ids, row_lengths = right_pad([encoded[i] for i in batch], pad)
            with torch.no_grad(), gather.at((row_lengths - 1)[:, None]):
                logits = model(input_ids=ids.to(device), logits_to_keep=0).logits  # each row's last token
                logits = logits[:, -1].float()
            rows = [examples[i] for i in batch]
            scores = answer_scores(encoder, logits, rows, exact, exact.last_hidden())
            for i, score in zip(batch, scores, strict=True):
                out[i] = score
            if on_batch:
                on_batch(len(batch))
    return [s for s in out if s is not None]


def answer_scores(
    encoder: SelfEvalEncoder,
    logits: Any,
    examples: Sequence[dict[str, Any]],
    exact: ExactHead | None = None,
    hidden: Any | None = None,
) -> list[ExampleScore]:
    """``ExampleScore`` of each row of ``logits`` ``[rows, vocab]`` (the position that predicts the answer
    token of ``examples[row]``). ``hidden``: the head's input at those rows, whose answer logits ``exact``
    recomputes in fp32 for a half-precision model (None: read ``logits``). A non-finite score is an
    error, never a silent 0.5."""
    import torch

    answers = [*encoder.keep_ids, *encoder.retry_ids]
    answers += [t for t in encoder.targets.values() if t not in answers]  # the trained tokens' losses
    column = {token: j for j, token in enumerate(answers)}
    n_keep = len(encoder.keep_ids)
    with torch.no_grad():
        answer_logits = logits[:, answers] if hidden is None else exact.logits(hidden, answers)
        logp = (answer_logits - torch.logsumexp(logits, dim=-1, keepdim=True)).cpu()
    out = []
    for row, ex in enumerate(examples):
        p_no = float(logp[row, :n_keep].exp().sum())
        p_yes = float(logp[row, n_keep:].exp().sum())
        label = ex.get("label")
        loss = (
            -float(logp[row, column[encoder.target_id(label)]])
            if label in (KEEP_LABEL, RETRY_LABEL)
            else math.nan
        )
        total = p_no + p_yes
        if not (math.isfinite(total) and total > 0):
            raise ProgramError(
                f"non-finite or zero answer probabilities (P(No) {p_no}, P(Yes) {p_yes}) "
                f"for an example of prompt {ex.get('prompt_id')!r}: the model is broken"
            )
        out.append(ExampleScore(p_no / total, p_no, p_yes, loss))
    return out
