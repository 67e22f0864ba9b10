"""The model's own chat template, as an SGLang frontend ``ChatTemplate``.

SGLang's frontend never renders the tokenizer's Jinja template: it builds text from per-role
prefix/suffix pairs picked by model path. A self-evaluation must be asked in the model's own
format, so we derive those pairs from the tokenizer's template by rendering sentinel messages,
and check the result against the Jinja rendering before trusting it.
"""

from __future__ import annotations

import warnings
from typing import Any

from sglang.lang.chat_template import ChatTemplate, get_chat_template, get_chat_template_by_model_path

_S, _U, _A, _U2 = "\x00SYS\x00", "\x00USR\x00", "\x00AST\x00", "\x00USR2\x00"


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _between(text: str, left: str, right: str) -> str:
    start = text.index(left) + len(left)
    return text[start : text.index(right, start)]


def derive_chat_template(tokenizer: Any, name: str = "from-tokenizer") -> ChatTemplate:
    """Derive role prefixes/suffixes and the default system prompt from a tokenizer's template.

    Raises ValueError when the template cannot be expressed as per-role prefix/suffix pairs.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    sys_msg, user, asst, user2 = (
        {"role": "system", "content": _S},
        {"role": "user", "content": _U},
        {"role": "assistant", "content": _A},
        {"role": "user", "content": _U2},
    )
    full = _render(tokenizer, [sys_msg, user, asst, user2])
    su = _render(tokenizer, [sys_msg, user])
    assistant_prefix = _render(tokenizer, [sys_msg, user], generation_prompt=True)[len(su) :]
    system_prefix = full[: full.index(_S)]
    user_suffix = su[su.index(_U) + len(_U) :]
    between_ua = _between(full, _U, _A)
    if not between_ua.startswith(user_suffix) or between_ua[len(user_suffix) :] != assistant_prefix:
        raise ValueError("the assistant turn does not follow the user turn as a plain prefix")
    after_a = _between(full, _A, _U2)  # = assistant_suffix + user_prefix
    sua = _render(tokenizer, [sys_msg, user, asst])
    assistant_suffix = sua[sua.index(_A) + len(_A) :]
    if not after_a.startswith(assistant_suffix):
        raise ValueError("the assistant suffix differs between the last and an inner turn")
    user_prefix = after_a[len(assistant_suffix) :]
    between_su = _between(full, _S, _U)  # = system_suffix + user_prefix
    if not user_prefix or not between_su.endswith(user_prefix):
        raise ValueError("cannot locate the user prefix")
    system_suffix = between_su[: len(between_su) - len(user_prefix)]
    default_system = _default_system_prompt(tokenizer, system_prefix, system_suffix)
    stop = tuple(s for s in {assistant_suffix.strip(), getattr(tokenizer, "eos_token", None) or ""} if s)
    template = ChatTemplate(
        name=name,
        default_system_prompt=default_system,
        role_prefix_and_suffix={
            "system": (system_prefix, system_suffix),
            "user": (user_prefix, user_suffix),
            "assistant": (assistant_prefix, assistant_suffix),
        },
        stop_str=tuple(sorted(stop)),
    )
    _check(tokenizer, template)
    return template


def _default_system_prompt(tokenizer: Any, system_prefix: str, system_suffix: str) -> str | None:
    """The system prompt a template inserts when none is given (Qwen's "You are Qwen, ..."), if any."""
    text = _render(tokenizer, [{"role": "user", "content": _U}])
    head = text[: text.index(_U)]
    if system_prefix and head.startswith(system_prefix) and system_suffix and system_suffix in head:
        return head[len(system_prefix) : head.index(system_suffix, len(system_prefix))]
    return None


def _check(tokenizer: Any, template: ChatTemplate) -> None:
    """The derived template must reproduce the Jinja rendering of a whole conversation."""
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    expected = _render(tokenizer, messages, generation_prompt=True)
    explicit = (
        [{"role": "system", "content": template.default_system_prompt}]
        if template.default_system_prompt
        else []
    )
    ours = template.get_prompt(explicit + messages) + template.role_prefix_and_suffix["assistant"][0]
    if ours != expected:
        raise ValueError(f"derived template renders {ours!r}, the tokenizer renders {expected!r}")


def chat_template_for(tokenizer: Any | None, model_path: str, name: str | None = None) -> ChatTemplate:
    """The frontend template to use: a named SGLang template, else derived from the tokenizer, else
    SGLang's guess from the model path (with a warning)."""
    if name:
        return get_chat_template(name)
    if tokenizer is not None:
        try:
            return derive_chat_template(tokenizer)
        except (ValueError, TypeError) as exc:
            warnings.warn(
                f"could not derive the chat template from the tokenizer ({exc}); "
                "falling back to SGLang's template for this model path",
                stacklevel=2,
            )
    return get_chat_template_by_model_path(model_path)


def render_selfeval_prompt(template: ChatTemplate, prompt: str, response: str, eval_prompt: str) -> str:
    """The exact text a program sends for a self-evaluation: [system default][user: prompt]
    [assistant: response][user: eval_prompt] and the opened assistant turn.

    Training data must use this text so that the fine-tuned model sees at training time what the
    programs send it at inference time (``tests/test_programs.py`` checks that the two agree)."""
    roles = template.role_prefix_and_suffix
    text = ""
    if template.default_system_prompt:
        text += roles["system"][0] + template.default_system_prompt + roles["system"][1]
    text += roles["user"][0] + prompt + roles["user"][1]
    text += roles["assistant"][0] + response + roles["assistant"][1]
    text += roles["user"][0] + eval_prompt + roles["user"][1]
    return text + roles["assistant"][0]
