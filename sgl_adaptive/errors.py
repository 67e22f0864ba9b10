"""Errors a user can cause and fix; the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""


class ModelNotFoundError(UserError):
    """The model path, GGUF file or hub name cannot be loaded."""


class BackendUnavailableError(UserError):
    """The SGLang server cannot be reached or answered with an error."""


class PromptTooLongError(UserError):
    """The prompt (with the chat template) does not fit into the model's context."""


class ProgramError(RuntimeError):
    """A program (or one of its forks) failed; carries the first underlying error."""
