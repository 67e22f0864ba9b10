"""A real SGLang server, through the frontend's ``RuntimeEndpoint``.

The subclass changes four things: (1) each logprob request also asks for the exact log
probabilities of the self-evaluation answer tokens (``token_ids_logprob``, which ``sgl.gen``
cannot pass), (2) the chat template is derived from the served model's own tokenizer when it is
readable here (SGLang's frontend otherwise guesses by model path), (3) every request states the
sampling fields the server would otherwise fill from its defaults (``NEUTRAL_SAMPLING``), and (4)
connection and server errors become one-line ``BackendUnavailableError``s.

The training-free scorers (``scorers.py``) read ``meta_info["output_top_logprobs"]`` of the sample
requests, as the frontend passes ``return_logprob`` / ``top_logprobs_num`` / ``return_text_in_logprobs``
through unchanged: per generated token a list of ``[logprob, token_id, text or null]``, the in-process
backend's shape. A server reports sampled tokens' log-probabilities at the sampling temperature unless it
runs with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (then at temperature 1, as the in-process backend does).
"""

from __future__ import annotations

import re
import urllib.error
from typing import Any

import requests
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglSamplingParams

try:  # sglang >= 0.5.21; the GPU recipe carries 0.5.17, where the frontend is otherwise identical
    from sglang.lang.global_config import global_config
except ImportError:  # pragma: no cover
    from sglang.global_config import global_config

from sgl_adaptive.chat_template import chat_template_for
from sgl_adaptive.costs import ModelShape
from sgl_adaptive.errors import BackendUnavailableError, PromptTooLongError
from sgl_adaptive.selfeval import SelfEvalConfig, answer_token_ids

_LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")

NEUTRAL_SAMPLING: dict[str, Any] = {
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
}
"""Sampling fields every request carries, "off" unless the frontend set them (it sets all but
``repetition_penalty``, which ``sgl.gen`` has no argument for). SGLang fills the fields a request leaves
out from its defaults, and by default (``--sampling-defaults model``) those come from the model's
generation_config.json: the official Qwen2.5-Instruct has top_k 20, top_p 0.8 and repetition_penalty
1.05. The programs draw plain temperature / nucleus samples, so nothing may be filled in."""


class SGLangEndpoint(RuntimeEndpoint):
    """``RuntimeEndpoint`` that reads the self-evaluation answer tokens exactly."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        chat_template_name: str | None = None,
        tokenizer_path: str | None = None,
        selfeval: SelfEvalConfig | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        base_url = base_url.rstrip("/")
        try:
            probe = requests.get(
                base_url + "/get_model_info",
                headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
                timeout=connect_timeout_s,
            )
        except requests.RequestException as exc:
            raise BackendUnavailableError(
                f"cannot reach the SGLang server at {base_url}: {_first_line(exc)}"
            ) from exc
        if probe.status_code != 200:
            raise BackendUnavailableError(
                f"the SGLang server at {base_url} answered /get_model_info with HTTP {probe.status_code}"
            )
        super().__init__(base_url, api_key=api_key, chat_template_name=chat_template_name)
        self.selfeval = selfeval or SelfEvalConfig()
        model_path = self.model_info.get("model_path", "")
        tokenizer = _load_tokenizer(tokenizer_path or model_path)
        self.chat_template = chat_template_for(tokenizer, model_path, chat_template_name)
        self.answer_ids = answer_token_ids(tokenizer, self.selfeval) if tokenizer is not None else {}
        self.model_shape = _model_shape(tokenizer_path or model_path)

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams) -> tuple[str, dict]:
        self._handle_dtype_to_regex(sampling_params)
        data: dict[str, Any] = {
            "text": s.text_,
            "sampling_params": {
                "skip_special_tokens": global_config.skip_special_tokens_in_output,
                "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
                **NEUTRAL_SAMPLING,
                **{k: v for k, v in sampling_params.to_srt_kwargs().items() if v is not None},
            },
        }
        for name in _LOGPROB_FIELDS:
            value = getattr(sampling_params, name, None)
            if value is not None:
                data[name] = value
        if sampling_params.return_logprob and self.answer_ids:
            data["token_ids_logprob"] = sorted(self.answer_ids)
        try:
            obj = self._generate_http_request(s, data)
        except (urllib.error.URLError, ConnectionError) as exc:
            raise BackendUnavailableError(
                f"lost the SGLang server at {self.base_url}: {_first_line(exc)}"
            ) from exc
        except RuntimeError as exc:
            if _CONTEXT_OVERFLOW.search(str(exc)):
                raise PromptTooLongError(f"the SGLang server refused the prompt: {_first_line(exc)}") from exc
            raise BackendUnavailableError(
                f"the SGLang server rejected a request: {_first_line(exc)}"
            ) from exc
        return obj["text"], obj["meta_info"]


_CONTEXT_OVERFLOW = re.compile(r"model's (maximum )?context|context length", re.IGNORECASE)
"""How an SGLang server (and ``http_server``) words a refusal of a prompt longer than the context."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _load_tokenizer(path: str) -> Any | None:
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # the server may run elsewhere: fall back to SGLang's template and top-k logprobs
        return None


def _model_shape(path: str) -> ModelShape | None:
    if not path:
        return None
    try:
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(path))
    except Exception:
        return None
