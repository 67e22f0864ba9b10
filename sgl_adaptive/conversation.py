"""What a method answers: a prompt (one user turn) or a conversation of OpenAI-style messages, checked into
``Message`` turns that the programs render with the model's chat template (``programs/common.open_prompt``).

The same check serves ``run(messages=...)``, ``batch`` lines and the OpenAI front, so each refuses the same
messages with the same words. Importing it imports neither torch nor sglang.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sgl_adaptive.errors import UserError

ROLES: tuple[str, ...] = ("system", "user", "assistant")
"""The roles a conversation may hold; ``developer`` (OpenAI's newer name for ``system``) is read as system."""
_ALIASES = {"developer": "system"}


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


Conversation = tuple[Message, ...]
Prompt = str | Conversation
"""A user prompt, or a checked conversation that ends with a user turn."""


class MessageError(UserError):
    """A conversation the programs cannot render; ``index`` is the message at fault (None: the list)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def check_messages(messages: Any) -> Conversation:
    """OpenAI-style ``messages`` (dicts with ``role`` and ``content``: a string or text parts) as turns.

    An optional first system (or developer) message, then user and assistant turns, the last a user turn
    with text. Refused, each with a one-line ``MessageError``: an assistant message without content (a tool
    call), tool and function turns, images and other non-text parts, a system message after the first turn,
    and unknown message fields: the programs would otherwise drop or guess them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessageError("`messages` must be a non-empty list")
    turns: list[Message] = []
    for i, raw in enumerate(messages):
        where = f"message {i}"
        if isinstance(raw, Message):
            raw = raw.to_dict()
        if not isinstance(raw, dict):
            raise MessageError(f"{where} must be an object with role and content", i)
        role = _ALIASES.get(raw.get("role"), raw.get("role"))
        if role in ("tool", "function"):
            raise MessageError(f"{where}: {role} messages are not supported (no tools are served)", i)
        if role not in ROLES:
            raise MessageError(
                f"{where}: unknown role {raw.get('role')!r} (use system, user or assistant)", i
            )
        if raw.get("tool_calls") or raw.get("function_call"):
            raise MessageError(f"{where}: assistant tool calls are not supported", i)
        extra = sorted(set(raw) - {"role", "content", "tool_calls", "function_call"})
        if extra:
            raise MessageError(f"{where}: unsupported field {extra[0]!r}", i)
        if role == "system" and i > 0:
            raise MessageError(f"{where}: a system message is supported only as the first message", i)
        content = raw.get("content")
        if content is None:
            raise MessageError(f"{where}: a {role} message needs content (null content is a tool call)", i)
        turns.append(Message(role, _text(content, where, i)))
    if turns[-1].role != "user":
        raise MessageError(
            f"the last message must be from the user (got {turns[-1].role}): the method answers a user turn",
            len(turns) - 1,
        )
    if not turns[-1].content.strip():
        raise MessageError("the last user message is empty", len(turns) - 1)
    return tuple(turns)


def _text(content: Any, where: str, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise MessageError(f"{where}: only text content parts are supported (got {kind!r})", index)
            parts.append(part["text"])
        return "".join(parts)
    raise MessageError(f"{where}: content must be a string or a list of text parts", index)


def as_conversation(prompt: Prompt | Sequence[Any]) -> Conversation:
    """``prompt`` as turns: a string is one user turn; a sequence of messages is checked."""
    if isinstance(prompt, str):
        return (Message("user", prompt),)
    return check_messages(list(prompt))


def last_user_text(prompt: Prompt) -> str:
    """The text a one-line log or a grader reads: the prompt itself, or the conversation's last user turn."""
    return prompt if isinstance(prompt, str) else prompt[-1].content
