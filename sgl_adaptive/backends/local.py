"""In-process backend: SGLang's ``BaseBackend`` over a Hugging Face model, for CPU or a GPU without a server.

The SGLang interpreter calls ``generate`` from one thread per fork with the full text of the
program state. We tokenise it (keeping generated tokens exact, see ``tokenization.py``), seed the
request deterministically and hand it to the batching engine, which shares prompt KV through its
prefix cache and decodes concurrent forks in one forward pass. ``meta_info`` has the server's
shape and meaning (prompt/cached/completion tokens, finish reason, logprobs).
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from typing import Any

import torch
from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod, token_length_normalized
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglSamplingParams

from sgl_adaptive.backends.engine import BatchedEngine, GenerationRequest
from sgl_adaptive.backends.precision import default_dtype, parse_dtype
from sgl_adaptive.backends.sampling import RowSampling
from sgl_adaptive.backends.tokenization import TokenMemo
from sgl_adaptive.chat_template import chat_template_for
from sgl_adaptive.costs import ModelShape
from sgl_adaptive.errors import ModelNotFoundError, PromptTooLongError, UserError
from sgl_adaptive.selfeval import SelfEvalConfig, answer_token_ids
from sgl_adaptive.weights import check_finite


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalBackend(BaseBackend):
    """Runs ``@sgl.function`` programs in this process; thread-safe and deterministic under a seed."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_path: str = "local",
        seed: int = 0,
        max_batch_size: int = 16,
        prefix_cache_bytes: int = 1 << 30,
        chat_template_name: str | None = None,
        selfeval: SelfEvalConfig | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.chat_template = chat_template_for(tokenizer, model_path, chat_template_name)
        self.selfeval = selfeval or SelfEvalConfig()
        self.answer_ids = answer_token_ids(tokenizer, self.selfeval)
        self.context_length = context_length or _context_length(model, tokenizer)
        self.model_shape = ModelShape.from_model(model)
        self.seed = seed
        self.memo = TokenMemo(tokenizer)
        self.engine = BatchedEngine(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            prefix_cache_bytes=prefix_cache_bytes,
            eos_token_ids=_eos_ids(model, tokenizer),
        )
        self._occurrences: Counter[str] = Counter()
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> LocalBackend:
        """Load a Hugging Face model directory (or hub name) and its tokenizer; ``dtype`` None or "auto" is
        bf16 on a GPU and on CPUs with native bf16, else fp32 (``precision.default_dtype``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sgl_adaptive.devices import check_device

        device = str(device) if device is not None else default_device()
        if device.startswith("cuda"):
            check_device(device)  # no CUDA: the CLI's one-line error, not torch's traceback
        try:
            dtype = parse_dtype(dtype)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype(device))
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(f"cannot load model {path!r}: {first}") from exc
        check_finite(model, f"model {path!r}")  # a diverged checkpoint is an error, not a server
        return cls(model.to(device), tokenizer, model_path=path, **kwargs)

    # ---- BaseBackend ---------------------------------------------------------------------------
    def get_model_name(self) -> str:
        return self.model_path

    def reseed(self, seed: int) -> None:
        """Restart the per-request seed sequence (a run with the same seed draws the same samples)."""
        with self._lock:
            self.seed = seed
            self._occurrences.clear()

    def tokenize(self, text: str) -> list[int]:
        return self.memo.encode(text)

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams) -> tuple[str, dict]:
        return self.complete(s.text_, sampling_params)

    def complete(
        self, text: str, sampling_params: SglSamplingParams, token_ids_logprob: list[int] | None = None
    ) -> tuple[str, dict]:
        """Continue ``text``; returns the new text and a server-shaped ``meta_info``."""
        ids = self.memo.encode(text)
        req = self._request(ids, text, sampling_params, token_ids_logprob)
        out = self.engine.submit(req).result()
        if out.text_ids is not None:
            self.memo.remember_output(text, ids, out.text, out.text_ids)
        return out.text, out.meta_info

    def generate_stream(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        yield self.generate(s, sampling_params=sampling_params)

    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        self._prefill_only(s.text_)

    def cache_prefix(self, prefix_str: str) -> None:
        self._prefill_only(prefix_str)

    def select(
        self,
        s: StreamExecutor,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod | None = None,
    ) -> ChoicesDecision:
        """Pick among ``choices`` by the model's logprobs of each continuation (no token healing)."""
        prefix = self.memo.encode(s.text_)
        input_lps, normalized = [], []
        for choice in choices:
            ids = self.memo.encode(s.text_ + choice)
            start = _common_prefix_len(prefix, ids)
            if start >= len(ids):
                raise UserError(f"select choice {choice!r} adds no tokens")
            req = GenerationRequest(ids=ids, max_new_tokens=0, input_logprob_start=max(start, 1))
            lps = self.engine.submit(req).result().meta_info["input_token_logprobs"]
            input_lps.append(lps)
            normalized.append(sum(lp for lp, _, _ in lps) / len(lps))
        method = choices_method or token_length_normalized
        return method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_lps,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=None,
        )

    def shutdown(self) -> None:
        self.engine.shutdown()

    def flush_cache(self) -> None:
        self.engine.prefix_cache.clear()

    # ---- helpers -------------------------------------------------------------------------------
    def check_prompt(self, ids: list[int]) -> None:
        if len(ids) >= self.context_length:
            raise PromptTooLongError(
                f"the prompt is {len(ids)} tokens with the chat template; the model's context is "
                f"{self.context_length} tokens"
            )

    def _prefill_only(self, text: str) -> None:
        ids = self.memo.encode(text)
        if ids and len(ids) < self.context_length:
            self.engine.submit(GenerationRequest(ids=ids, max_new_tokens=0)).result()

    def _request(
        self, ids: list[int], text: str, sp: SglSamplingParams, token_ids_logprob: list[int] | None = None
    ) -> GenerationRequest:
        self.check_prompt(ids)
        if sp.n not in (None, 1):
            raise UserError("n > 1 in one gen is not supported: fork the program state instead")
        if sp.regex or sp.json_schema or sp.dtype or (sp.stop_regex and sp.stop_regex != ()):
            raise UserError(
                "constrained decoding (regex, json_schema, dtype, stop_regex) needs an SGLang server"
            )
        stop = (sp.stop,) if isinstance(sp.stop, str) else tuple(sp.stop or ())
        top_k = sp.top_k if sp.top_k is not None and sp.top_k > 0 else -1
        sampling = RowSampling(
            temperature=float(sp.temperature),
            top_p=float(sp.top_p),
            top_k=top_k,
            min_p=float(sp.min_p or 0.0),
            frequency_penalty=float(sp.frequency_penalty or 0.0),
            presence_penalty=float(sp.presence_penalty or 0.0),
        )
        sampling.generator.manual_seed(self._request_seed(text, sp))
        return GenerationRequest(
            ids=ids,
            max_new_tokens=min(int(sp.max_new_tokens), self.context_length - len(ids)),
            sampling=sampling,
            min_new_tokens=int(sp.min_new_tokens or 0),
            stop=tuple(s for s in stop if s),
            stop_token_ids=frozenset(sp.stop_token_ids or ()),
            ignore_eos=bool(sp.ignore_eos),
            return_logprob=bool(sp.return_logprob),
            top_logprobs_num=int(sp.top_logprobs_num or 0) if sp.return_logprob else 0,
            return_text_in_logprobs=sp.return_text_in_logprobs is not False,
            token_ids_logprob=tuple(self.answer_ids if token_ids_logprob is None else token_ids_logprob)
            if sp.return_logprob
            else (),
        )

    def _request_seed(self, text: str, sp: SglSamplingParams) -> int:
        """Seed from (backend seed, text, sampling params, how often this pair was seen): identical forks
        get distinct samples and a rerun after ``reseed`` gets the same multiset."""
        key = f"{text}\x00{sp.temperature}\x00{sp.top_p}\x00{sp.top_k}\x00{sp.min_p}\x00{sp.max_new_tokens}"
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        with self._lock:
            occurrence = self._occurrences[digest]
            self._occurrences[digest] += 1
            seed = self.seed
        material = f"{seed}\x00{digest}\x00{occurrence}".encode()
        return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _context_length(model: Any, tokenizer: Any) -> int:
    config = getattr(model.config, "text_config", None) or model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 4096)
    return int(min(limit, getattr(tokenizer, "model_max_length", limit) or limit))


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
