"""The OpenAI chat-completions protocol: a request body checked into a ``ChatRequest``, and a ``Result``
turned into a completion, its stream chunks and OpenAI-shaped errors. No HTTP, no backend."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from sgl_adaptive.config import (
    KNOBS,
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
    METHOD_OPTIONS,
    METHODS,
    MethodConfig,
)
from sgl_adaptive.conversation import Conversation, MessageError, check_messages
from sgl_adaptive.errors import UserError
from sgl_adaptive.result import Result
from sgl_adaptive.scorers import REWARD_MODEL

_RENAMED = {"samples": "n", "max_tokens": "max_new_tokens"}
"""Request fields named otherwise in ``MethodConfig``. OpenAI's ``n`` is the number of choices (only 1 is
served), so the sample budget is ``samples``; ``max_tokens`` is OpenAI's name for the token budget."""
if "stop" in KNOBS:  # OpenAI's `stop` means stop sequences: the adaptive stop rule is `stop_rule`
    _RENAMED["stop_rule"] = "stop"
_SERVER_SIDE = {"reward_model"}
"""Knobs a client may not set: a reward model is a path on the server's disk, loaded into its memory."""
KNOB_FIELDS: dict[str, str] = {
    **_RENAMED,
    "seed": "seed",
    **{knob: knob for knob in sorted(KNOBS - _SERVER_SIDE) if knob not in _RENAMED.values()},
}
"""Request field -> ``MethodConfig`` field: every knob a method reads (so a knob added to ``MethodConfig``
and ``METHOD_OPTIONS`` is a request field too) but the server-side ones, the token budget and the seed."""
_KNOB_TYPES: dict[str, type] = {
    api: type(f.default) for f in fields(MethodConfig) for api, knob in KNOB_FIELDS.items() if f.name == knob
}
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "parallel_tool_calls": (True, False),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}
"""Standard fields accepted only at values that change nothing (what clients send by default); any other
value is refused."""
_IGNORED = {"user", "metadata", "store"}
"""Standard fields with no effect on the answer."""
_FIELDS = {
    "model",
    "messages",
    "method",
    "stream",
    "stream_options",
    "return_candidates",
    "max_completion_tokens",
    "stop",
    "logprobs",
    "top_logprobs",
}
"""Fields read here besides the knobs (``KNOB_FIELDS``)."""
_HINTS = {
    "best_of": " (the sample budget is `samples`)",
    "reward_model": " (a reward model is not chosen per request)",
    "functions": " (no tools are served)",
    "function_call": " (no tools are served)",
}
_GREEDY_NEUTRAL = {"temperature": 0.0, "top_p": 1.0}
"""Sampling fields that method greedy accepts at the values it decodes with (and drops)."""
_CLI_NAMES = {"--" + cfg.replace("_", "-"): api for api, cfg in KNOB_FIELDS.items()}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self, status: int, message: str, *, type: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code=code)


@dataclass(frozen=True)
class ServerLimits:
    """What a client may ask for, and the defaults it gets."""

    model: str
    """The one model id served (``/v1/models``); a request naming another is a 404."""
    default_method: str = "adaptive"
    max_samples: int = 64
    max_tokens: int | None = None
    """The largest ``max_tokens`` a request may ask for (None: the backend's context is the limit)."""


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completion request."""

    prompt: Conversation
    method: str
    config: MethodConfig
    stream: bool = False
    include_usage: bool = False
    return_candidates: bool = False
    given: dict[str, Any] = field(default_factory=dict)
    """The knobs the client set, by request field name (for the log line)."""

    @property
    def greedy(self) -> bool:
        """Nothing is sampled: method greedy, or temperature 0 (which ``runner.run`` answers greedily)."""
        return self.method == "greedy" or self.config.temperature == 0

    @property
    def logprobs(self) -> bool:
        return self.config.logprobs is not None


class _Problems:
    """The 400s of one request, in the order the checks run; raised together as one error."""

    def __init__(self) -> None:
        self.errors: list[ApiError] = []

    def add(self, error: ApiError) -> None:
        self.errors.append(error)

    def check(self, step: Callable[[], Any]) -> Any:
        """``step()``, or None with its ``ApiError`` recorded."""
        try:
            return step()
        except ApiError as exc:
            self.add(exc)
            return None

    def raise_any(self) -> None:
        if not self.errors:
            return
        first = self.errors[0]
        if len(self.errors) == 1:
            raise first
        message = "; ".join(f"{e.param}: {e.message}" if e.param else e.message for e in self.errors)
        raise bad_request(
            f"{len(self.errors)} problems: {message}", first.param, first.code or "invalid_value"
        )


def parse_chat_request(body: Any, limits: ServerLimits) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body; raise ``ApiError`` (400, or 404 for an unknown model). Every
    400 of a request is reported in one error, in a fixed order: unknown fields (by name), fields outside
    their neutral values, model, messages, method, the token budget, stop, logprobs, the knobs (by name),
    the method's checks, streaming; ``param`` names the first."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    body = {k: v for k, v in body.items() if v is not None}  # null is "not given"
    problems = _Problems()
    for name in sorted(body.keys() - _FIELDS - KNOB_FIELDS.keys() - _NEUTRAL.keys() - _IGNORED):
        hint = _HINTS.get(name, "")
        problems.add(bad_request(f"unsupported field {name!r}{hint}", name, "unsupported_parameter"))
    for name, allowed in _NEUTRAL.items():
        if name in body and not any(_same(body[name], value) for value in allowed):
            hint = "; the sample budget is the `samples` field" if name == "n" else ""
            accepted = ", ".join(map(repr, allowed))
            message = f"{name}={body[name]!r} is not supported (accepted: {accepted}){hint}"
            problems.add(bad_request(message, name, "unsupported_parameter"))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        message = "`model` is required (a string; see GET /v1/models)"
        problems.add(bad_request(message, "model", "missing_required_parameter"))
    prompt = problems.check(lambda: _conversation(body.get("messages")))
    method = body.get("method", limits.default_method)
    if method not in METHODS:
        problems.add(bad_request(f"unknown method {method!r}; choose one of {', '.join(METHODS)}", "method"))
        method = None
    if "max_completion_tokens" in body:
        if "max_tokens" in body:
            message = "give max_tokens or max_completion_tokens, not both"
            problems.add(bad_request(message, "max_completion_tokens"))
        else:
            body["max_tokens"] = body.pop("max_completion_tokens")
    stops = problems.check(lambda: _stop_sequences(body.get("stop")))
    top_logprobs = problems.check(lambda: _logprobs(body))
    if method == "greedy":
        for name, value in _GREEDY_NEUTRAL.items():
            if name in body and not isinstance(body[name], bool) and body[name] == value:
                body.pop(name)
    given = {}
    for name in sorted(KNOB_FIELDS.keys() & body.keys()):
        value = problems.check(lambda name=name: _typed(name, body[name]))
        if value is not None:
            given[name] = value
    config = None
    if method is not None and not problems.errors:
        config = problems.check(lambda: _config(method, given, limits, stops or (), top_logprobs))
    stream = problems.check(lambda: _flag(body, "stream"))
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or options.keys() - {"include_usage"}:
        problems.add(bad_request("stream_options may only hold include_usage", "stream_options"))
        options = {}
    elif options and not stream:
        problems.add(bad_request("stream_options is only allowed with stream: true", "stream_options"))
    include_usage = problems.check(lambda: _flag(options, "include_usage"))
    return_candidates = problems.check(lambda: _flag(body, "return_candidates"))
    problems.raise_any()
    if model != limits.model:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {limits.model!r}",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    assert config is not None and method is not None and prompt is not None
    return ChatRequest(
        prompt=prompt,
        method=method,
        config=config,
        stream=bool(stream),
        include_usage=bool(include_usage),
        return_candidates=bool(return_candidates),
        given=given,
    )


def _config(
    method: str, given: dict[str, Any], limits: ServerLimits, stops: tuple[str, ...], logprobs: int | None
) -> MethodConfig:
    """The method's ``MethodConfig`` from the request's knobs, with the checks the command line makes."""
    _check_used(method, given)
    if given.get("scorer") == REWARD_MODEL:
        raise bad_request(
            f"scorer {REWARD_MODEL!r} needs a reward model, and this server has none (sgl-adaptive serve "
            "loads no reward model); choose another scorer",
            "scorer",
            "unsupported_parameter",
        )
    if given.get("samples", 1) > limits.max_samples:
        raise bad_request(f"samples must be at most {limits.max_samples} on this server", "samples")
    if limits.max_tokens is not None and given.get("max_tokens", 1) > limits.max_tokens:
        raise bad_request(f"max_tokens must be at most {limits.max_tokens} on this server", "max_tokens")
    knobs = {KNOB_FIELDS[name]: value for name, value in given.items()}
    knobs.setdefault("seed", None)  # no seed: no reseeding of a backend that other requests share
    try:
        config = MethodConfig(**knobs, stop_sequences=stops, logprobs=logprobs)
        config.check_for(method)
    except UserError as exc:
        raise _config_error(str(exc)) from None
    return config


def _same(value: Any, allowed: Any) -> bool:
    """``value == allowed`` without ``True == 1`` (a bool stands only for a bool)."""
    return isinstance(value, bool) == isinstance(allowed, bool) and value == allowed


def _conversation(messages: Any) -> Conversation:
    """The checked turns (``conversation.check_messages``): a message the programs cannot render is a 400."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list", "messages", "missing_required_parameter")
    try:
        return check_messages(messages)
    except MessageError as exc:
        raise bad_request(str(exc), "messages", "unsupported_messages") from None


def _stop_sequences(stop: Any) -> tuple[str, ...]:
    """OpenAI's ``stop``: a string or a list of up to 4 non-empty strings (``[]``: none)."""
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(
            f"stop must be a string or a list of strings (got {stop!r})", "stop", "invalid_type"
        )
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop may hold at most {MAX_STOP_SEQUENCES} sequences (got {len(stops)})", "stop")
    if not all(stops):
        raise bad_request("a stop sequence must not be empty", "stop")
    return tuple(stops)


def _logprobs(body: dict) -> int | None:
    """``logprobs: true`` asks for the chosen answer's token log-probabilities, with ``top_logprobs``
    (0-20) alternatives each; returns that count, or None when not asked."""
    wanted = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    if isinstance(top, bool) or not isinstance(top, int):
        raise bad_request(f"top_logprobs must be an integer (got {top!r})", "top_logprobs", "invalid_type")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs must be within [0, {MAX_TOP_LOGPROBS}] (got {top})", "top_logprobs")
    if not wanted:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    return top


def _typed(name: str, value: Any) -> Any:
    """``value`` checked against the type of the knob's default (an int may stand for a float)."""
    kind = _KNOB_TYPES.get(name, object)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad_request(f"{name} must be an integer (got {value!r})", name, "invalid_type")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise bad_request(f"{name} must be a number (got {value!r})", name, "invalid_type")
    if kind is str and not isinstance(value, str):
        raise bad_request(f"{name} must be a string (got {value!r})", name, "invalid_type")
    return float(value) if kind is float else value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false (got {value!r})", name, "invalid_type")
    return value


def _check_used(method: str, given: dict[str, Any]) -> None:
    """A knob the method does not read is refused, as on the command line (``seed`` and ``max_tokens``
    are read by every method)."""
    for name in sorted(given):
        knob = KNOB_FIELDS[name]
        if knob in ("seed", "max_new_tokens") or knob in METHOD_OPTIONS[method]:
            continue
        users = [m for m in METHODS if knob in METHOD_OPTIONS[m]]
        raise bad_request(f"{name} is not used by method {method} (only by {', '.join(users)})", name)


def _config_error(message: str) -> ApiError:
    """A ``MethodConfig`` error, with its command-line option names turned into request fields."""
    params = [_CLI_NAMES[m] for m in re.findall(r"--[a-z-]+", message) if m in _CLI_NAMES]
    message = re.sub(r"--[a-z-]+", lambda m: _CLI_NAMES.get(m.group(0), m.group(0)), message)
    return bad_request(message, params[0] if params else None)


# ---- responses ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """A finished request: the method's ``Result`` and the prompt's token count."""

    request: ChatRequest
    result: Result
    prompt_tokens: int
    model: str
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def finish_reason(self) -> str:
        return "stop" if self.result.candidates[self.result.best].finished else "length"

    def usage(self) -> dict[str, int]:
        """OpenAI usage: the prompt once, and every token generated for every sample (not only the answer)."""
        completion = self.result.costs.generated_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def extension(self) -> dict[str, Any]:
        """The ``sgl_adaptive`` object: the cost record, and the candidates when asked for."""
        record = self.result.to_dict()
        record.pop("answer")
        candidates = record.pop("candidates")
        record["answer_tokens"] = self.result.candidates[self.result.best].tokens
        if self.request.return_candidates:
            record["candidates"] = candidates
        return record

    def logprobs(self) -> dict[str, Any] | None:
        """OpenAI's ``choices[0].logprobs`` when asked for: the chosen sample's tokens (those of the answer
        text, without the end-of-turn token or a cut stop sequence), each with its ``top_logprobs``
        alternatives. They are the model's own distribution on the in-process backend; an SGLang server
        reports them at the sampling temperature unless it runs with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``."""
        if not self.request.logprobs:
            return None
        top = self.request.config.logprobs or 0
        tokens = self.result.candidates[self.result.best].logprobs or []

        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": max(logprob, -9999.0), "bytes": list(token.encode())}

        content = [
            {
                **entry(t["token"], t["logprob"]),
                "top_logprobs": [entry(a["token"], a["logprob"]) for a in t["top_logprobs"][:top]],
            }
            for t in tokens
        ]
        return {"content": content, "refusal": None}

    def body(self) -> dict[str, Any]:
        """The ``chat.completion`` object."""
        message = {"role": "assistant", "content": self.result.answer}
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": self.finish_reason,
            "logprobs": self.logprobs(),
        }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
            "sgl_adaptive": self.extension(),
        }

    def chunks(self) -> list[dict[str, Any]]:
        """The ``chat.completion.chunk`` objects of the chosen answer: the role, the text, the finish reason
        (with the ``sgl_adaptive`` object), and the usage when ``stream_options.include_usage`` is set."""

        def chunk(
            delta: dict, finish: str | None = None, logprobs: Any = None, **extra: Any
        ) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return {**self._chunk_head(), "choices": [choice], **extra}

        out = [chunk({"role": "assistant", "content": ""})]
        out.append(chunk({"content": self.result.answer}, logprobs=self.logprobs()))
        out.append(chunk({}, self.finish_reason, sgl_adaptive=self.extension()))
        if self.request.include_usage:
            out.append({**self._chunk_head(), "choices": [], "usage": self.usage()})
        return out

    def _chunk_head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }


def models_body(model: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``."""
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "sgl-adaptive"}],
    }
