"""One sample (or token) budget spent across a batch of prompts: the engine of ``sgl-adaptive batch``.

Round 1 draws one sample per prompt (two for ``agreement`` allocation, when the budget allows). Then each
round gives one more sample to each of up to ``concurrency`` prompts chosen by ``rules.allocate`` (the
lowest best score, the least agreeing answers, or the fewest samples for the ``even`` baseline), until
the budget is spent or every prompt is closed: at ``n`` samples, or, for ``method="adaptive"``, once its
stop rule holds. A round's draws run concurrently (the in-process backend batches them). Each draw is
one ``best-of-n`` run with n = 1: for ``adaptive`` at the annealed temperature of the prompt's k-th
sample. The backend is reseeded once per batch, so a run is deterministic under ``seed`` (the in-process
backend seeds each request by its text and how often that text was seen). A token budget counts the
samples' generated tokens (not the evaluations); each draw's ``max_new_tokens`` is capped so that a
round cannot overspend it.

A prompt's line (``id``, ``answer``, ``samples``, ``tokens``, ...) is appended to the output once the
prompt can get no more samples; a rerun skips the ids already there and spends what the budget has left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgl_adaptive.answers import check_math, extract_number, gsm8k_reference, numbers_equal
from sgl_adaptive.config import MethodConfig
from sgl_adaptive.conversation import Conversation, Prompt, check_messages, last_user_text
from sgl_adaptive.data import read_jsonl
from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.prompts import PromptItem, to_item
from sgl_adaptive.rules import ALLOCATIONS, allocate, check_name
from sgl_adaptive.schedules import Annealing
from sgl_adaptive.scorers import REWARD_MODEL

BUDGET_UNITS: tuple[str, ...] = ("samples", "tokens")
BATCH_METHODS: tuple[str, ...] = ("best-of-n", "adaptive")
"""``best-of-n``: every sample at ``temperature``; ``adaptive``: annealed, and a prompt closes once its
stop rule holds (its budget goes to the others)."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BatchSettings:
    """How ``run_batch`` spends the budget; ``config.n`` is the most samples one prompt may get."""

    budget: int
    unit: str = "samples"
    allocation: str = "score"
    method: str = "best-of-n"
    concurrency: int = 8
    config: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        for what, name, valid in (
            ("budget unit", self.unit, BUDGET_UNITS),
            ("allocation", self.allocation, ALLOCATIONS),
            ("batch method", self.method, BATCH_METHODS),
        ):
            try:
                check_name(what, name, valid)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        if self.budget < 1:
            raise UserError(f"--budget must be at least 1 (got {self.budget})")
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be at least 1 (got {self.concurrency})")
        self.config.check_for(self.method)  # e.g. the threshold stop refuses an uncalibrated scorer

    @property
    def scored(self) -> bool:
        """Whether the samples are scored (by ``config.scorer``): the allocation, selector or stop rule reads
        scores."""
        stops = self.method == "adaptive" and self.config.stop_rule().needs_scores
        return self.allocation == "score" or self.config.selector_rule().needs_scores or stops


@dataclass
class PromptSamples:
    """One prompt's samples so far, in draw order."""

    item: PromptItem
    texts: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    self_evals: int = 0
    rm_tokens: int = 0
    """Tokens the reward model read (``--scorer rm``)."""
    stopped: bool = False
    """The stop rule held (``adaptive``)."""

    def record(self, config: MethodConfig) -> dict[str, Any]:
        """The output line: the selector's pick among the samples, and what they cost."""
        indices = list(range(len(self.texts)))
        best = config.selector_rule().pick(indices, self.scores, self.answers)
        line: dict[str, Any] = {
            "id": self.item.id,
            "answer": self.texts[best],
            "final_answer": self.answers[best],
            "score": self.scores[best],
            "best": best,
            "samples": len(self.texts),
            "tokens": sum(self.tokens),
            "self_evals": self.self_evals,
            "scores": self.scores,
            "final_answers": self.answers,
        }
        if config.scorer == REWARD_MODEL:
            line["rm_tokens"] = self.rm_tokens
        if self.item.reference is not None:
            line["reference"] = self.item.reference
            line["correct"] = is_correct(self.item, self.texts[best])
        return line


@dataclass(frozen=True)
class BatchSummary:
    prompts: int
    samples: int
    tokens: int
    graded: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.graded if self.graded else None

    @classmethod
    def of(cls, records: Sequence[dict[str, Any]]) -> BatchSummary:
        graded = [r for r in records if "correct" in r]
        return cls(
            len(records),
            sum(int(r.get("samples", 0)) for r in records),
            sum(int(r.get("tokens", 0)) for r in records),
            len(graded),
            sum(bool(r["correct"]) for r in graded),
        )


def is_correct(item: PromptItem, text: str) -> bool:
    """A response against the item's reference: ``math-verify`` for MATH items, else GSM8K numbers."""
    if item.reference is None:
        raise ValueError(f"prompt {item.id!r} has no reference")
    if item.kind == "math":
        return check_math(text, item.reference)
    return numbers_equal(extract_number(text), item.reference)


@dataclass(frozen=True)
class BatchItem(PromptItem):
    """A prompt of the batch; a ``messages`` line keeps its conversation (``prompt`` is its last user turn)."""

    messages: Conversation | None = None

    @property
    def question(self) -> Prompt:
        """What the method answers: the conversation, else the prompt."""
        return self.messages if self.messages is not None else self.prompt


def load_batch(path: str | Path) -> list[BatchItem]:
    """The prompts of a JSON Lines file: ``{"id": ..., "prompt": ...}`` (or ``question``, ``problem``,
    ... as ``finetune.prompts.to_item`` reads them), or ``{"id": ..., "messages": [...]}`` with OpenAI-style
    messages (a system message first, earlier turns, a user turn last); a ``reference`` field, or a
    GSM8K-style ``answer``, is graded. A missing file, a malformed line, a record without a prompt, messages
    the programs cannot render or a repeated id is an error."""
    items: list[BatchItem] = []
    for number, record in enumerate(read_jsonl(path), start=1):
        try:
            item = _batch_item(record)
        except UserError as exc:
            raise UserError(f"{path}: record {number}: {exc}") from None
        if not item.prompt.strip():
            raise UserError(f"{path}: record {number}: the prompt is empty")
        items.append(dataclasses.replace(item, reference=_reference(item, record)))
    if not items:
        raise UserError(f"no prompts in {path}")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise UserError(f"{path}: the id {item.id!r} appears twice (ids name the output lines)")
        seen.add(item.id)
    return items


def _batch_item(record: dict[str, Any]) -> BatchItem:
    if "messages" not in record:
        return BatchItem(**dataclasses.asdict(to_item(record)))
    messages = check_messages(record["messages"])
    rid = record.get("id")
    key = json.dumps([m.to_dict() for m in messages], ensure_ascii=False)
    ident = str(rid) if rid is not None else "m-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return BatchItem(ident, last_user_text(messages), messages=messages)


def _reference(item: PromptItem, record: dict[str, Any]) -> str | None:
    if item.reference is not None:
        return item.reference
    if record.get("reference") is not None:
        return str(record["reference"])
    if record.get("answer") is not None:
        try:
            return gsm8k_reference(str(record["answer"]))
        except ValueError:
            return None
    return None


def finished_records(path: Path) -> list[dict[str, Any]]:
    """The lines already written to an output file (a torn last line is dropped, as ``done_ids`` does)."""
    from sgl_adaptive.finetune.build_data import done_ids

    done_ids(path)  # truncates a line cut short by an interrupted write
    return list(read_jsonl(path)) if path.is_file() else []


def spent(records: Sequence[dict[str, Any]], unit: str) -> int:
    return sum(int(r.get(unit, 0)) for r in records)


def check_budget(prompts: int, settings: BatchSettings, budget: int | None = None) -> None:
    """At least one sample (one token) per prompt."""
    budget = settings.budget if budget is None else budget
    if budget < prompts:
        left = "" if budget == settings.budget else f" ({budget} left after the finished prompts)"
        raise UserError(
            f"--budget {settings.budget} {settings.unit}{left} is less than the {prompts} prompts: every "
            f"prompt needs at least one {settings.unit.rstrip('s')}"
        )


def run_batch(
    items: Sequence[PromptItem],
    backend: Any,
    settings: BatchSettings,
    *,
    budget: int | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Spend ``budget`` (default ``settings.budget``) over ``items``; returns one record per prompt, in
    the order they closed; ``on_record`` gets each as soon as its prompt is closed."""
    budget = settings.budget if budget is None else budget
    check_budget(len(items), settings, budget)
    config = settings.config
    if config.seed is not None and hasattr(backend, "reseed"):
        backend.reseed(config.seed)
    states = [PromptSamples(item) for item in items]
    records: list[dict[str, Any]] = []
    closed: set[int] = set()
    used = 0
    say = progress or (lambda line: None)

    def close_finished() -> None:
        for p, state in enumerate(states):
            if p not in closed and (state.stopped or len(state.texts) >= config.n):
                close(p)

    def close(p: int) -> None:
        closed.add(p)
        record = states[p].record(config)
        records.append(record)
        score = f"{record['score']:.3f}" if record["score"] is not None else "-"
        samples = "1 sample" if record["samples"] == 1 else f"{record['samples']} samples"
        say(f"  {record['id']}: {samples}, score {score}")
        if on_record is not None:
            on_record(record)

    def draw_round(prompts: list[int]) -> None:
        nonlocal used
        with ThreadPoolExecutor(settings.concurrency) as pool:
            for start in range(0, len(prompts), settings.concurrency):
                chunk = prompts[start : start + settings.concurrency]
                max_tokens = config.max_new_tokens
                if settings.unit == "tokens":
                    max_tokens = min(max_tokens, (budget - used) // (len(prompts) - start))
                draws = [pool.submit(_draw, states[p], backend, settings, max_tokens) for p in chunk]
                for draw in draws:
                    draw.result()
                used += len(chunk) if settings.unit == "samples" else sum(states[p].tokens[-1] for p in chunk)
        close_finished()

    first = 2 if settings.allocation == "agreement" and budget >= 2 * len(items) else 1
    for round_index in range(min(first, config.n)):
        say(f"round {round_index + 1}: a sample for each of {len(items)} prompts")
        draw_round([p for p in range(len(states)) if p not in closed])
    round_number = first
    while True:
        open_prompts = [p for p in range(len(states)) if p not in closed]
        slots = min(settings.concurrency, budget - used)
        views = [(s.scores, s.answers) for s in states]
        chosen = allocate(settings.allocation, views, slots, open_prompts)
        if not chosen:
            break
        round_number += 1
        ids = ", ".join(states[p].item.id for p in chosen[:4]) + (" …" if len(chosen) > 4 else "")
        what = "a sample" if len(chosen) == 1 else f"{len(chosen)} samples"
        say(f"round {round_number}: {what} to {ids} ({used}/{budget} {settings.unit} spent)")
        draw_round(sorted(chosen))
    for p in range(len(states)):
        if p not in closed:
            close(p)
    return records


def _draw(state: PromptSamples, backend: Any, settings: BatchSettings, max_tokens: int) -> None:
    """One more sample of the prompt (scored when the settings read scores); the stop rule is checked."""
    from sgl_adaptive.programs import PROGRAMS
    from sgl_adaptive.runner import run_program

    config = settings.config
    anneal = Annealing(config.temperature, config.anneal if settings.method == "adaptive" else "none")
    draw_config = dataclasses.replace(
        config,
        n=1,
        temperature=anneal(len(state.texts)),
        max_new_tokens=max(max_tokens, 1),
        selector="argmax" if settings.scored else "majority",
        seed=None,  # reseeded once per batch, not per draw (that would repeat the first sample)
    )
    # run_program, not run: the first annealed draw is at temperature 0 and is still scored
    result = run_program(PROGRAMS["best-of-n"], _question(state.item), backend, draw_config, name="best-of-n")
    candidate = result.candidates[0]
    state.texts.append(candidate.text)
    state.scores.append(candidate.score)
    state.answers.append(extract_number(candidate.text))
    state.tokens.append(candidate.tokens)
    state.self_evals += result.costs.self_evals
    state.rm_tokens += result.costs.rm_tokens
    if settings.method == "adaptive":
        indices = list(range(len(state.texts)))
        state.stopped = config.stop_rule().should_stop(indices, state.scores, state.answers)


def _question(item: PromptItem) -> Prompt:
    return item.question if isinstance(item, BatchItem) else item.prompt


def run_batch_file(
    source: str | Path,
    out: str | Path,
    backend_factory: Callable[[], Any],
    settings: BatchSettings,
    *,
    compare_even: bool = False,
    progress: Progress | None = None,
) -> tuple[BatchSummary, BatchSummary | None]:
    """``run_batch`` from a prompts file to an output file (resumed: ids already there are skipped and
    their cost is taken off the budget); the summary of every prompt's line, and with ``compare_even``
    that of an even split of the same budget over all the prompts (not written)."""
    items = load_batch(source)
    out = Path(out)
    ids = {item.id for item in items}
    done = [r for r in finished_records(out) if r.get("id") in ids]
    done_ids = {r["id"] for r in done}
    todo = [item for item in items if item.id not in done_ids]
    left = settings.budget - spent(done, settings.unit)
    check_budget(len(todo), settings, left)
    if compare_even and not any(item.reference is not None for item in items):
        raise UserError("--compare-even needs prompts with a reference (a 'reference' or 'answer' field)")
    say = progress or (lambda line: None)
    if done:
        say(f"resuming: {len(done)} of {len(items)} prompts already in {out}; {left} {settings.unit} left")
    backend = backend_factory() if todo or compare_even else None
    records = list(done)
    if todo:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as handle:

            def write(record: dict[str, Any]) -> None:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()

            records += run_batch(todo, backend, settings, budget=left, on_record=write, progress=progress)
    even = None
    if compare_even:
        say(f"even split of the same budget over {len(items)} prompts …")
        baseline = dataclasses.replace(settings, allocation="even")
        even = BatchSummary.of(run_batch(items, backend, baseline, progress=progress))
    return BatchSummary.of(records), even
