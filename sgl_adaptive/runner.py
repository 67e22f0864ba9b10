"""Run a method on a prompt with any backend: the Python API behind ``sgl-adaptive run``.

Importing this module is cheap: torch, transformers and sglang are imported when a backend is loaded or a
program runs, after the arguments have been checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sgl_adaptive.config import MethodConfig
from sgl_adaptive.conversation import Prompt, check_messages
from sgl_adaptive.devices import check_device
from sgl_adaptive.errors import ProgramError, UserError
from sgl_adaptive.result import Result
from sgl_adaptive.selfeval import score_from_meta_info

# The interpreter reports an exception in a fork's thread only as a warning with a traceback;
# the programs check every fork themselves and raise the error, so the warning is noise.
warnings.filterwarnings("ignore", message=r"Error in stream_executor", category=UserWarning)

DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
"""The ``--dtype`` names of the in-process backend (``auto``: bf16 where it is fast, else fp32)."""

GREEDY = "greedy"
"""What a sampling method runs at temperature 0 (``run``)."""
Progress = Callable[[str], None]
"""Receives one line per event of a run: a round starts, a sample stops, a score arrives."""


def run(
    prompt: Prompt | None = None,
    backend: Any = None,
    method: str = "adaptive",
    config: MethodConfig | None = None,
    *,
    messages: Sequence[Any] | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> Result:
    """Answer ``prompt`` (or the conversation ``messages``: OpenAI-style dicts, an optional system message
    first and a user turn last) with ``method`` on ``backend`` (a ``LocalBackend``, an ``SGLangEndpoint`` or
    any SGLang frontend backend). ``overrides`` replace fields of ``config`` (e.g. ``n=8``,
    ``stop_sequences=["\n\n"]``); ``progress`` (e.g. ``print``) gets a line per round, finished sample and
    score as they come.

    Temperature 0 is greedy decoding: every sample of a sampling method would be the same, so the method is
    answered by one greedy sample without evaluation, and the result says so (``requested_method``)."""
    from sgl_adaptive.programs import PROGRAMS

    if backend is None:
        raise TypeError("run() needs a backend")
    config = dataclasses.replace(config or MethodConfig(), **overrides)
    config.check_for(method)
    if messages is not None:
        if prompt is not None:
            raise UserError("give either a prompt or messages, not both")
        chat: Prompt = check_messages(messages)
    elif prompt is None:
        raise UserError("no prompt: give a prompt or messages")
    else:
        chat = prompt
    name = GREEDY if config.temperature == 0 else method
    result = run_program(PROGRAMS[name], chat, backend, config, name=name, progress=progress)
    if name != method:
        result.requested_method = method
    return result


def run_program(
    program: Any,
    prompt: Prompt,
    backend: Any,
    config: MethodConfig,
    name: str,
    *,
    progress: Progress | None = None,
    **program_args: Any,
) -> Result:
    """Run any of our ``@sgl.function`` programs (e.g. ``sample_pool``) on a prompt or a checked conversation
    and build its ``Result``: errors of the program or of any fork are raised, wall time and FLOPs are added."""
    if isinstance(prompt, str) and not prompt.strip():
        raise UserError("the prompt is empty")
    if not isinstance(prompt, str):
        prompt = check_messages(prompt)
    if config.seed is not None and hasattr(backend, "reseed"):
        backend.reseed(config.seed)
    seen = ProgressBackend(backend, config, progress) if progress is not None else backend
    start = time.perf_counter()
    state = program.run(prompt=prompt, config=config, backend=seen, **program_args)
    wall = time.perf_counter() - start
    error = state.error()
    if error is not None:
        if isinstance(error, UserError):
            raise error
        raise ProgramError(f"{name} failed: {type(error).__name__}: {error}") from error
    outcome = state.ret_value
    costs = outcome.meter.totals(getattr(backend, "model_shape", None), wall_s=wall)
    return Result(name, outcome.candidates, outcome.best, costs, config.to_dict())


def read_prompt(source: str | Path) -> str:
    """The prompt held in file ``source`` (``"-"``: standard input), read as UTF-8, without its final
    line break; a missing, unreadable or empty source is a ``UserError``."""
    stdin = str(source) == "-"
    what = "the prompt from standard input" if stdin else f"the prompt file {str(source)!r}"
    try:
        if stdin:
            raw = getattr(sys.stdin, "buffer", None)
            text = raw.read().decode("utf-8") if raw is not None else sys.stdin.read()
        else:
            text = Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {what}: {exc.strerror or type(exc).__name__}") from None
    if not text.strip():
        raise UserError(f"{what} is empty")
    return text.rstrip("\r\n")


def check_dtype(dtype: str | None) -> None:
    """A ``--dtype`` name of ``DTYPES`` (``None`` is ``auto``); no torch import."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")


def load_backend(
    model: str | None = None,
    endpoint: str | None = None,
    *,
    seed: int = 0,
    device: str | None = None,
    dtype: Any = None,
    console: Any = None,
    **kwargs: Any,
) -> Any:
    """An SGLang server backend for ``endpoint``, else an in-process backend for ``model`` (a directory,
    a GGUF file, a hub name, or None for the embedded default model) on ``device`` in ``dtype``.

    Device, dtype and model path are checked before torch, transformers and sglang are imported. With a
    ``console``, one status line at a time: the model build's own progress (download, conversion), then
    "loading the model"."""
    if model and endpoint:
        raise UserError("give either --model or --endpoint, not both")
    if endpoint:
        with _status(console, f"connecting to {endpoint} …"):
            from sgl_adaptive.backends.endpoint import SGLangEndpoint

            return SGLangEndpoint(endpoint, **kwargs)
    from sgl_adaptive.model_store import resolve_model

    check_device(device)
    if dtype is not None and dtype not in DTYPES:
        _torch_dtype(dtype)  # other names and torch dtypes: checked before a possibly long download
    path = resolve_model(model, console=console)
    torch_dtype = _torch_dtype(dtype)
    with _status(console, "loading the model …"):
        from sgl_adaptive.backends.local import LocalBackend

        return LocalBackend.from_pretrained(path, device=device, dtype=torch_dtype, seed=seed, **kwargs)


def _status(console: Any, message: str) -> Any:
    """A spinner on ``console`` (a rich Console), or nothing without one."""
    return console.status(message) if console is not None else contextlib.nullcontext()


def _torch_dtype(dtype: Any) -> Any:
    from sgl_adaptive.backends.precision import parse_dtype

    try:
        return parse_dtype(dtype)
    except ValueError as exc:
        raise UserError(str(exc)) from None


class ProgressBackend:
    """Delegates to a backend and reports, from the requests it sees, each round, sample and score.

    Every sample starts from the same text (the prompt and the opened assistant turn): a request for
    that text is a new sample, and one after a self-evaluation opens a new round (when no evaluation
    request is sent, because the rules read no score or the scorer needs no request: one while no sample
    is being generated). A request that continues a sample's text extends it (pruning); a one-token
    logprob request is an evaluation (self-evaluation or judge) of the sample whose text it extends."""

    def __init__(self, backend: Any, config: MethodConfig, report: Progress) -> None:
        self._backend, self._config, self._report = backend, config, report
        self._lock = threading.Lock()
        self._start: str | None = None
        self._texts: list[str] = []
        self._tokens: list[int] = []
        self._evals: list[int] = []
        self._rounds = 0
        self._scored = False
        self._best: float | None = None
        reads_scores = config.selector_rule().needs_scores or config.stop_rule().needs_scores
        self._unscored = not (reads_scores and config.scorer_rule().evaluated)
        self._generating = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def generate(self, s: Any, sampling_params: Any) -> tuple[str, dict]:
        text = s.text_
        evaluation = bool(sampling_params.return_logprob)
        sample = not evaluation and (sampling_params.max_new_tokens or 0) > 0
        number = self._started(text) if sample else None
        out, meta = self._backend.generate(s, sampling_params=sampling_params)
        if number is not None:
            self._stopped(number, text + out, meta)
        elif evaluation:
            self._evaluated(text, meta)
        return out, meta

    def _started(self, text: str) -> int | None:
        with self._lock:
            if self._start is None:
                self._start = text
            if text != self._start:
                return next((i for i, t in enumerate(self._texts) if t == text), None)
            if self._rounds == 0 or self._scored or (self._unscored and self._generating == 0):
                self._rounds, self._scored = self._rounds + 1, False
                self._report(f"round {self._rounds}: sampling …")
            self._generating += 1
            self._texts.append(text)
            self._tokens.append(0)
            self._evals.append(0)
            return len(self._texts) - 1

    def _stopped(self, number: int, text: str, meta: dict) -> None:
        with self._lock:
            if self._texts[number] == self._start:
                self._generating -= 1  # the sample's first request (not a continuation after pruning)
            self._texts[number] = text
            self._tokens[number] += int(meta.get("completion_tokens", 0))
            tokens, budget = self._tokens[number], self._config.max_new_tokens
            if (meta.get("finish_reason") or {}).get("type") != "length":
                status = "finished"
            elif tokens >= budget:
                status = f"cut at --max-new-tokens {budget}"
            else:
                status = "paused for pruning"
            self._report(f"  sample {number + 1}: {tokens} tokens, {status}")

    def _evaluated(self, text: str, meta: dict) -> None:
        try:
            score = score_from_meta_info(meta, self._config.evaluation()).score
        except ValueError:
            return
        with self._lock:
            self._scored = True
            self._best = score if self._best is None else max(self._best, score)
            # The sample whose text the evaluation extends; of identical texts, the least evaluated.
            matches = [i for i, t in enumerate(self._texts) if text.startswith(t)]
            number = max(matches, key=lambda i: (len(self._texts[i]), -self._evals[i], i), default=None)
            if number is not None:
                self._evals[number] += 1
            who = f"sample {number + 1}" if number is not None else "a sample"
            self._report(f"  {who}: score {score:.3f} (best so far {self._best:.3f})")
