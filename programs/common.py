"""The building blocks the programs share: opening the prompt, drawing forked samples, extending
them, scoring them (self-evaluation or the zero-shot judge in side branches, the training-free scorers
from the samples' own top-k log-probabilities, or an external reward model), and turning them into a
``ProgramOutcome``.

This is the programs' whole contact with the SGLang frontend: ``sgl.user``/``assistant_begin``/
``assistant_end``/``gen``, ``state.fork``/``join``, ``get_meta_info`` and ``error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import sglang as sgl

from sgl_adaptive.answers import extract_number
from sgl_adaptive.config import MethodConfig
from sgl_adaptive.conversation import Prompt, as_conversation
from sgl_adaptive.costs import CostMeter
from sgl_adaptive.errors import ProgramError, UserError
from sgl_adaptive.result import Candidate
from sgl_adaptive.rules import pruned_keep
from sgl_adaptive.schedules import Annealing
from sgl_adaptive.scorers import REWARD_MODEL
from sgl_adaptive.selfeval import SelfEvalConfig, score_from_meta_info

EVAL_VAR = "selfeval"

NEUTRAL_SAMPLING: dict[str, Any] = {
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "min_tokens": 0,
    "ignore_eos": False,
}
"""The sampling fields every ``sgl.gen`` of the programs sets besides temperature and top-p: sampling is
plain temperature / nucleus sampling, nothing else. Sent explicitly, because an SGLang server fills the
fields a request leaves unset from its defaults (``--sampling-defaults model``, the default, reads the
model's generation_config.json: top_k 20 and repetition_penalty 1.05 for the official Qwen2.5-Instruct),
and a caller's ``program.run(top_k=...)`` would otherwise leak into every request. ``top_k = -1`` is
SGLang's "off". (``repetition_penalty``, which ``sgl.gen`` cannot pass, is added by ``SGLangEndpoint``.)"""


class ProgramRun:
    """One program execution: its cost meter and every fork it opened (closed on exit, even on error,
    so no interpreter worker thread outlives the program)."""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.meter = CostMeter()
        self.prompt: Prompt = ""
        """The prompt or conversation (``open_prompt``): what a reward model reads before each response."""
        self._groups: list[Any] = []

    def fork(self, state: Any, n: int) -> Any:
        group = state.fork(n)
        self._groups.append(group)
        return group

    def __enter__(self) -> ProgramRun:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for group in reversed(self._groups):
            try:
                group.join()
            except Exception:
                if exc is None:
                    raise
        self._groups.clear()


@dataclass
class Sample:
    """One forked response: its program state, what it generated so far and its evaluations."""

    state: Any
    index: int
    temperature: float
    round: int
    parts: int = 0
    tokens: int = 0
    finished: bool = False
    exhausted: bool = False
    """Reached the token budget without finishing."""
    pruned: bool = False
    scores: list[tuple[int, float]] = field(default_factory=list)
    top_logprobs: list[Any] = field(default_factory=list)
    """Per generated token, its top-k log-probability entries (training-free scorers only)."""
    free_scores: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Training-free scores recorded beside ``scores`` (the bench's pool: ``sample_pool(free_scorers=…)``)."""
    token_logprobs: list[Any] = field(default_factory=list)
    """Per generated token ``(logprob, token_id, text)``, when asked for (``MethodConfig.logprobs``)."""
    stop_sequences: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        """Complete: stopped by the model or by the budget (eligible for selection)."""
        return self.finished or self.exhausted

    @property
    def score(self) -> float | None:
        return self.scores[-1][1] if self.scores else None

    def extend(self, max_tokens: int, config: MethodConfig, with_logprobs: bool = False) -> None:
        """Queue the generation of up to ``max_tokens`` more tokens (asynchronous); with a training-free
        scorer (or ``with_logprobs``), ask for each generated token's top-k log-probabilities (no text:
        only the values are read)."""
        scorer = config.scorer_rule()
        logprobs: dict[str, Any] = {}
        if scorer.training_free or with_logprobs:
            logprobs = dict(return_logprob=True, top_logprobs_num=scorer.top_k, return_text_in_logprobs=False)
        if config.logprobs is not None:  # the client's: with each token's text
            top = max(config.logprobs, logprobs.get("top_logprobs_num", 0))
            logprobs = dict(return_logprob=True, top_logprobs_num=top, return_text_in_logprobs=True)
        stops = {"stop": list(config.stop_sequences)} if config.stop_sequences else {}
        self.state += sgl.gen(
            f"part{self.parts}",
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=config.top_p,
            **NEUTRAL_SAMPLING,
            **logprobs,
            **stops,
        )
        self.stop_sequences = config.stop_sequences
        self.parts += 1

    def collect(self, meter: CostMeter, budget: int) -> int:
        """Wait for the last queued part; record its cost; return the tokens it generated."""
        meta = self.state.get_meta_info(f"part{self.parts - 1}")
        if meta is None:
            raise_fork_error(self.state, f"sample {self.index}")
        meter.record("sample", meta)
        new = int(meta.get("completion_tokens", 0))
        self.tokens += new
        self.top_logprobs += meta.get("output_top_logprobs") or []
        self.token_logprobs += meta.get("output_token_logprobs") or []
        self.finished = meta.get("finish_reason", {}).get("type") != "length"
        if not self.finished and self.parts > 1 and _stop_at(self.text(), self.stop_sequences) is not None:
            self.finished = True  # a stop sequence across the pause of a pruned sample: it ends here too
        self.exhausted = not self.finished and self.tokens >= budget
        return new

    def text(self) -> str:
        """The response so far, cut at a stop sequence (one the backend could not see: across two parts)."""
        text = "".join(self.state[f"part{i}"] for i in range(self.parts))
        cut = _stop_at(text, self.stop_sequences)
        return text if cut is None else text[:cut]

    def to_candidate(self) -> Candidate:
        return Candidate(
            text=self.text(),
            score=self.score,
            finished=self.finished,
            tokens=self.tokens,
            temperature=self.temperature,
            round=self.round,
            pruned=self.pruned,
            scores=list(self.scores),
            free_scores={name: list(values) for name, values in self.free_scores.items()},
            logprobs=self.token_logprobs_of_text() if self.token_logprobs else None,
        )

    def token_logprobs_of_text(self) -> list[dict[str, Any]]:
        """The tokens that make up ``text()`` (not the end-of-turn token, nor a cut stop sequence), each as
        ``{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}``."""
        length, covered, out = len(self.text()), 0, []
        tops = self.top_logprobs if len(self.top_logprobs) == len(self.token_logprobs) else []
        for i, (logprob, _, piece) in enumerate(self.token_logprobs):
            if covered >= length:
                break
            piece = piece or ""
            covered += len(piece)
            alternatives = [{"token": t or "", "logprob": lp} for lp, _, t in (tops[i] if tops else [])]
            out.append({"token": piece, "logprob": logprob, "top_logprobs": alternatives})
        return out


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop sequence in ``text`` starts (None: none there)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def raise_fork_error(state: Any, what: str) -> None:
    """Raise the error a fork's thread swallowed (the interpreter only warns about it)."""
    error = state.error()
    if isinstance(error, UserError):
        raise error
    if error is not None:
        raise ProgramError(f"{what} failed: {type(error).__name__}: {error}") from error
    raise ProgramError(f"{what} produced no result")


PROMPT_VAR = "prompt_prefill"


ROLE_TURNS = {"system": sgl.system, "user": sgl.user, "assistant": sgl.assistant}


def open_prompt(run: ProgramRun, s: Any, prompt: Prompt) -> None:
    """The conversation's turns, each rendered by the chat template (a plain prompt is one user turn; the
    template's default system prompt is inserted by the interpreter unless the conversation opens with a
    system message), then an explicit zero-token request that prefills it once and is metered as the
    prompt's cost. Every sample and evaluation extends this text, so the whole conversation is shared.

    (``fork(n)`` would cache the prompt anyway, through ``commit_lazy_operations``, but that request
    bypasses the programs and so the cost meter; after this one it is a full cache hit.)"""
    run.prompt = prompt
    for message in as_conversation(prompt):
        s += ROLE_TURNS[message.role](message.content)
    s += sgl.gen(PROMPT_VAR, max_tokens=0, temperature=0.0, top_p=1.0, **NEUTRAL_SAMPLING)
    meta = s.get_meta_info(PROMPT_VAR)
    if meta is None:
        raise_fork_error(s, "the prompt prefill")
    run.meter.record("prompt", meta)


def draw(
    run: ProgramRun, s: Any, temperatures: list[float], round_index: int, first_index: int
) -> list[Sample]:
    """Fork one branch per temperature from the prompt state, open each assistant turn, count the round."""
    group = run.fork(s, len(temperatures))
    run.meter.start_round(len(temperatures))
    samples = []
    for i, (branch, temperature) in enumerate(zip(group, temperatures, strict=True)):
        branch += sgl.assistant_begin()
        samples.append(Sample(branch, first_index + i, temperature, round_index))
    return samples


def draw_pool(run: ProgramRun, s: Any) -> list[Sample]:
    """The ``config.n`` samples of one batch, annealed over the batch when ``config.anneal_best_of_n``."""
    config = run.config
    anneal = Annealing(config.temperature, config.anneal if config.anneal_best_of_n else "none")
    return draw(run, s, [anneal(k) for k in range(config.n)], round_index=0, first_index=0)


def generate(run: ProgramRun, samples: list[Sample], max_tokens: int, with_logprobs: bool = False) -> None:
    """Extend every sample by up to ``max_tokens`` tokens concurrently; wait; account the longest."""
    for smp in samples:
        smp.extend(max_tokens, run.config, with_logprobs)
    longest = 0
    for smp in samples:
        longest = max(longest, smp.collect(run.meter, run.config.max_new_tokens))
    run.meter.add_critical_path(longest)


def ask_selfeval(state: Any, config: SelfEvalConfig) -> None:
    """Append the evaluation turn after a closed assistant turn: the question as a user turn, the opened
    assistant turn, and a one-token greedy gen with the answer tokens' logprobs (``EVAL_VAR``)."""
    state += sgl.user(config.prompt)
    state += sgl.assistant_begin()
    state += sgl.gen(
        EVAL_VAR,
        max_tokens=1,
        temperature=0.0,
        top_p=1.0,
        **NEUTRAL_SAMPLING,
        return_logprob=True,
        top_logprobs_num=config.top_logprobs_num,
        return_text_in_logprobs=True,
    )


def self_evaluate(run: ProgramRun, samples: list[Sample]) -> None:
    """Score each sample in a side branch, so the evaluation turn never enters the sample's text.

    The branch closes the (possibly unfinished) assistant turn, asks the evaluation question (the
    self-evaluation's, or the zero-shot judge's: ``MethodConfig.evaluation``) and opens the assistant
    turn; one token is decoded with the answer tokens' logprobs.
    """
    config = run.config.evaluation()
    branches = []
    for smp in samples:
        branch = run.fork(smp.state, 1)  # waits for the sample's pending generation
        branch[0] += sgl.assistant_end()
        ask_selfeval(branch[0], config)
        branches.append(branch)
    for smp, branch in zip(samples, branches, strict=True):
        meta = branch[0].get_meta_info(EVAL_VAR)
        if meta is None:
            raise_fork_error(branch[0], f"self-evaluation of sample {smp.index}")
        run.meter.record("eval", meta)
        smp.scores.append((smp.tokens, score_from_meta_info(meta, config).score))


def reward_model_score(run: ProgramRun, samples: list[Sample]) -> None:
    """Score each sample's text so far (finished or not) with the external reward model
    (``reward_model.shared``: loaded once per process); every read is metered (``CostMeter.record_rm``)."""
    from sgl_adaptive.reward_model import shared

    if not samples:
        return
    model = shared(run.config.reward_model or "")
    rewards = model.score(run.prompt, [smp.text() for smp in samples])
    for smp, score, tokens, flops in zip(samples, rewards.scores, rewards.tokens, rewards.flops, strict=True):
        run.meter.record_rm(tokens, flops)
        smp.scores.append((smp.tokens, score))


def score_samples(run: ProgramRun, samples: list[Sample]) -> None:
    """Score each sample as generated so far by the configured scorer (``scorers.Scorer``): evaluation
    requests (self-eval, judge), the reward model (rm), or, for a training-free scorer, its tokens'
    top-k log-probabilities (no request)."""
    scorer = run.config.scorer_rule()
    if scorer.evaluated:
        self_evaluate(run, samples)
        return
    if scorer.kind == REWARD_MODEL:
        reward_model_score(run, samples)
        return
    for smp in samples:
        score = scorer.score(smp.top_logprobs)
        if score is not None:
            smp.scores.append((smp.tokens, score))


def best_index(samples: list[Sample], config: MethodConfig) -> int:
    """The answer among the complete samples (all samples if none is complete), by the configured
    selector (``rules.Selector``: argmax of the score by default; ties to the earliest drawn)."""
    pool = [s.index for s in samples if s.done] or [s.index for s in samples]
    scores, answers = sample_views(samples)
    return config.selector_rule().pick(pool, scores, answers)


def sample_views(samples: list[Sample]) -> tuple[list[float | None], list[str | None]]:
    """Scores and extracted final answers (``extract_number``) indexed by sample index (samples are
    numbered 0 .. m-1 in draw order); only complete samples have an answer."""
    size = max((s.index for s in samples), default=-1) + 1
    scores: list[float | None] = [None] * size
    answers: list[str | None] = [None] * size
    for smp in samples:
        scores[smp.index] = smp.score
        if smp.done:
            answers[smp.index] = extract_number(smp.text())
    return scores, answers


def keep_top(samples: list[Sample], k: int, config: MethodConfig) -> list[Sample]:
    """The ``k`` samples early pruning keeps (``rules.pruned_keep``: best scored, or random); the others
    are marked pruned if unfinished."""
    by_index = {smp.index: smp for smp in samples}
    scores = {smp.index: smp.score for smp in samples}
    kept = set(pruned_keep(sorted(by_index), scores, k, config.prune_by, config.seed or 0))
    for smp in samples:
        if smp.index not in kept:
            smp.pruned = not smp.done
    return [by_index[i] for i in sorted(kept)]


@dataclass
class ProgramOutcome:
    """What every program returns (``state.ret_value``); the runner adds wall time and FLOPs."""

    candidates: list[Candidate]
    best: int
    meter: CostMeter


def outcome(run: ProgramRun, samples: list[Sample]) -> ProgramOutcome:
    ordered = sorted(samples, key=lambda s: s.index)
    return ProgramOutcome([s.to_candidate() for s in ordered], best_index(ordered, run.config), run.meter)
