"""The options of every program, in one validated dataclass (the CLI and the API are built on it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from sgl_adaptive.errors import UserError
from sgl_adaptive.rules import PRUNE_BY, SELECTORS, STOP_RULES, Selector, StopRule, check_name
from sgl_adaptive.scorers import CALIBRATED, DEFAULT_JUDGE_PROMPT, REWARD_MODEL, SCORERS, Scorer, judge_config
from sgl_adaptive.selfeval import SelfEvalConfig

Method = Literal["greedy", "best-of-n", "adaptive", "prune", "adaptive-prune"]
METHODS: tuple[str, ...] = ("greedy", "best-of-n", "adaptive", "prune", "adaptive-prune")
_SAMPLING = {
    "n",
    "temperature",
    "top_p",
    "selector",
    "vote_temperature",
    "scorer",
    "confidence_window",
    "scorer_top_k",
    "judge_prompt",
    "reward_model",
}
_STOPPING = {
    "threshold",
    "anneal",
    "stop",
    "stop_confidence",
    "stop_window",
    "stop_warmup",
    "stop_percentile",
}
METHOD_OPTIONS: dict[str, frozenset[str]] = {
    "greedy": frozenset(),
    "best-of-n": frozenset(_SAMPLING),
    "adaptive": frozenset({*_SAMPLING, *_STOPPING}),
    "prune": frozenset({*_SAMPLING, "prune_at", "keep", "prune_by"}),
    "adaptive-prune": frozenset({*_SAMPLING, *_STOPPING, "prune_at", "keep", "prune_by"}),
}
"""The method-specific knobs each method reads (all read ``max_new_tokens`` and ``seed``)."""
KNOBS: frozenset[str] = frozenset().union(*METHOD_OPTIONS.values())
MAX_STOP_SEQUENCES = 4
"""As OpenAI's chat completions."""
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class MethodConfig:
    """Knobs of the programs; each program reads the ones it needs."""

    n: int = 16
    """Sample budget (Best-of-N size; the cap of adaptive sampling)."""
    threshold: float = 0.98
    """Adaptive sampling stops once the best score reaches it (1.0: never stop early)."""
    prune_at: int = 128
    """Early pruning: tokens generated before the partial responses are scored."""
    keep: int = 4
    """Early pruning: samples continued after the pruning point (of n)."""
    prune_by: str = "score"
    """Early pruning keeps the best-scored samples (score) or random ones (random: the paper's ablation)."""
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    anneal: Literal["paper", "none"] = "paper"
    """Temperature annealing over the samples drawn so far (adaptive methods; best-of-n with ``anneal_best_of_n``)."""
    anneal_best_of_n: bool = False
    """Apply the annealing schedule to plain Best-of-N too (a paper ablation)."""
    scorer: str = "self-eval"
    """What a sample's score is: self-eval or judge (an evaluation request), confidence or self-certainty
    (from the sample's own top-k log-probabilities, no request), rm (an external reward model;
    ``scorers.py``)."""
    judge_prompt: str = DEFAULT_JUDGE_PROMPT
    """judge: the question asked after the response (the score is P("Yes") renormalised)."""
    reward_model: str | None = None
    """rm: the reward model's folder or hub name (loaded once per process: ``reward_model.shared``)."""
    confidence_window: int = 64
    """confidence: tokens per sliding window (DeepConf's lowest group confidence)."""
    scorer_top_k: int = 20
    """confidence and self-certainty: top log-probabilities read per generated token."""
    selector: str = "argmax"
    """Which complete sample is the answer: argmax (score), majority or weighted-majority (``rules.py``)."""
    vote_temperature: float = 0.1
    """weighted-majority: each sample's vote is the softmax of the scores at this temperature."""
    stop: str = "threshold"
    """When adaptive sampling stops: threshold (best score), beta (Adaptive-Consistency), esc or deepconf
    (``rules.py``)."""
    stop_confidence: float = 0.95
    """beta: stop once P(the leading answer beats the runner-up) exceeds it."""
    stop_window: int = 4
    """esc: stop once this many latest complete samples agree on their answer."""
    stop_warmup: int = 4
    """deepconf: the first this many scored complete samples are the warm-up that sets the threshold."""
    stop_percentile: float = 90.0
    """deepconf: the threshold is this percentile (0..100) of the warm-up scores (90: DeepConf-low)."""
    seed: int | None = 0
    stop_sequences: tuple[str, ...] = ()
    """Stop sequences (OpenAI's ``stop``, at most 4): a sample ends at the first one it generates, which is
    cut with what follows, before it is scored or voted on. Every method reads them."""
    logprobs: int | None = None
    """Keep each sample's token log-probabilities with this many (0-20) top alternatives (None: not kept)."""
    selfeval: SelfEvalConfig = field(default_factory=SelfEvalConfig)

    def __post_init__(self) -> None:
        stops = self.stop_sequences
        stops = (stops,) if isinstance(stops, str) else tuple(stops or ())
        if len(stops) > MAX_STOP_SEQUENCES:
            raise UserError(f"at most {MAX_STOP_SEQUENCES} stop sequences (got {len(stops)})")
        if not all(isinstance(s, str) and s for s in stops):
            raise UserError(f"a stop sequence must be a non-empty string (got {list(stops)!r})")
        object.__setattr__(self, "stop_sequences", stops)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise UserError(f"top_logprobs must be within [0, {MAX_TOP_LOGPROBS}] (got {self.logprobs})")
        if self.n < 1:
            raise UserError(f"--n must be at least 1 (got {self.n})")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"--threshold must be within [0, 1] (got {self.threshold})")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.prune_at < 1:
            raise UserError(f"--prune-at must be at least 1 (got {self.prune_at})")
        if self.keep < 1:
            raise UserError(f"--keep must be at least 1 (got {self.keep})")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must be within (0, 1] (got {self.top_p})")
        if self.anneal not in ("paper", "none"):
            raise UserError(f"--anneal must be 'paper' or 'none' (got {self.anneal!r})")
        for what, name, valid in (
            ("selector", self.selector, SELECTORS),
            ("stop rule", self.stop, STOP_RULES),
            ("pruning rule", self.prune_by, PRUNE_BY),
            ("scorer", self.scorer, SCORERS),
        ):
            try:
                check_name(what, name, valid)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        if self.confidence_window < 1:
            raise UserError(f"--confidence-window must be at least 1 (got {self.confidence_window})")
        if self.scorer_top_k < 1:
            raise UserError(f"scorer_top_k must be at least 1 (got {self.scorer_top_k})")
        if not self.judge_prompt.strip():
            raise UserError("--judge-prompt is empty")
        if self.scorer == REWARD_MODEL and not self.reward_model:
            raise UserError(
                "--scorer rm needs --reward-model DIR (a Hugging Face sequence-classification reward model)"
            )
        if self.reward_model is not None and self.scorer != REWARD_MODEL:
            raise UserError(
                f"--reward-model is read only by --scorer {REWARD_MODEL} (this run has --scorer {self.scorer})"
            )
        if self.vote_temperature <= 0:
            raise UserError(f"--vote-temperature must be > 0 (got {self.vote_temperature})")
        if not 0.0 < self.stop_confidence < 1.0:
            raise UserError(f"--stop-confidence must be within (0, 1) (got {self.stop_confidence})")
        if self.stop_window < 1:
            raise UserError(f"--stop-window must be at least 1 (got {self.stop_window})")
        if self.stop_warmup < 1:
            raise UserError(f"--stop-warmup must be at least 1 (got {self.stop_warmup})")
        if not 0.0 <= self.stop_percentile <= 100.0:
            raise UserError(f"--stop-percentile must be within [0, 100] (got {self.stop_percentile})")

    def scorer_rule(self) -> Scorer:
        return Scorer(self.scorer, self.confidence_window, self.scorer_top_k)

    def evaluation(self) -> SelfEvalConfig:
        """What an evaluation request asks and reads: the zero-shot judge's question for ``scorer="judge"``,
        else the self-evaluation (``selfeval``)."""
        return judge_config(self.judge_prompt) if self.scorer == "judge" else self.selfeval

    def selector_rule(self) -> Selector:
        return Selector(self.selector, self.vote_temperature)

    def stop_rule(self) -> StopRule:
        return StopRule(
            self.stop,
            self.threshold,
            self.stop_confidence,
            self.stop_window,
            self.stop_warmup,
            self.stop_percentile,
        )

    def check_for(self, method: str) -> None:
        """Checks that depend on the method."""
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method in ("prune", "adaptive-prune") and self.keep > self.n:
            raise UserError(f"--keep must not exceed --n for {method} (got keep={self.keep}, n={self.n})")
        if (
            method in ("adaptive", "adaptive-prune")
            and self.stop == "threshold"
            and not self.scorer_rule().calibrated
        ):
            raise UserError(
                f"--stop threshold needs a calibrated score in [0, 1]; the {self.scorer} scorer has none: "
                f"choose --stop {' or '.join(r for r in STOP_RULES if r != 'threshold')}, "
                f"or --scorer {' or '.join(CALIBRATED)}"
            )

    def to_dict(self) -> dict:
        """Plain JSON values (the stop sequences as a list)."""
        return {**asdict(self), "stop_sequences": list(self.stop_sequences)}


RULE_OPTIONS: dict[str, tuple[str, str]] = {
    "threshold": ("stop", "threshold"),
    "stop_confidence": ("stop", "beta"),
    "stop_window": ("stop", "esc"),
    "stop_warmup": ("stop", "deepconf"),
    "stop_percentile": ("stop", "deepconf"),
    "vote_temperature": ("selector", "weighted-majority"),
    "confidence_window": ("scorer", "confidence"),
    "judge_prompt": ("scorer", "judge"),
    "reward_model": ("scorer", REWARD_MODEL),
}
"""Knobs read by one rule only: knob -> (the rule's field, the rule)."""


def check_options_used(
    method: str, given: set[str] | frozenset[str], config: MethodConfig | None = None
) -> None:
    """Refuse knobs given explicitly (field names, e.g. ``{"keep"}``) that ``method`` does not read, such
    as ``--keep`` with best-of-n, or (with ``config``) that its rules do not read, such as
    ``--stop-window`` with ``--stop beta``: silently ignoring them would hide a mistake."""
    for name in sorted(given & KNOBS):
        option = "--" + name.replace("_", "-")
        if name not in METHOD_OPTIONS.get(method, KNOBS):
            users = [m for m in METHODS if name in METHOD_OPTIONS[m]]
            raise UserError(f"{option} is not used by {method} (only by {', '.join(users)})")
        if config is not None and name in RULE_OPTIONS:
            field_name, rule = RULE_OPTIONS[name]
            chosen = getattr(config, field_name)
            if chosen != rule:
                flag = "--" + field_name
                raise UserError(f"{option} is read only by {flag} {rule} (this run has {flag} {chosen})")
