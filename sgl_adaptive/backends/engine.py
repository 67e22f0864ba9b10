"""A batching generation engine over a Hugging Face causal LM (the in-process backend's core).

One worker thread owns the model. Requests from any thread are queued; the worker admits them
(prefill, reusing KV from the prefix cache), keeps all unfinished requests in one running batch
and decodes it one token per step, admitting new requests between steps (continuous batching).
Rows of the batch are left-padded to a common KV length; positions are passed explicitly, so a
row computes exactly what it would alone.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from sgl_adaptive.backends.precision import ExactHead
from sgl_adaptive.backends.prefix_cache import KV, PrefixCache
from sgl_adaptive.backends.sampling import RowSampling, sample_next

_ids = itertools.count()


@dataclass
class GenerationRequest:
    """One generation (or prefill-only / scoring) request, already tokenised."""

    ids: list[int]
    max_new_tokens: int
    sampling: RowSampling = field(default_factory=RowSampling)
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    """Top log-probabilities per generated token (``output_top_logprobs``: the training-free scorers)."""
    return_text_in_logprobs: bool = True
    """Logprob entries carry the token's text (else None in its place, as an SGLang server does)."""
    token_ids_logprob: tuple[int, ...] = ()
    input_logprob_start: int | None = None
    """Score the prompt's own tokens from this index on (``input_token_logprobs``)."""
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class GenerationOutput:
    text: str
    text_ids: list[int] | None
    """Output ids whose decoding is exactly ``text`` (end of sequence and stop strings trimmed), if known."""
    meta_info: dict[str, Any]


@dataclass
class _Row:
    req: GenerationRequest
    cached: int
    length: int
    """Tokens whose KV is in the batch (prompt + fed outputs)."""
    out_ids: list[int] = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    ids_logprobs: list = field(default_factory=list)
    input_logprobs: list | None = None


@dataclass
class _Prefilled:
    kv: KV
    logits: torch.Tensor
    """Next-token logits after the prompt, ``[vocab]``."""
    hidden: torch.Tensor | None
    """The head's input at the last prompt position (``ExactHead`` on), for exact answer-token logits."""
    cached: int
    input_logprobs: list | None


class BatchedEngine:
    """Thread-safe front (``submit``) of a single model worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        prefix_cache_bytes: int = 1 << 30,
        coalesce_s: float = 0.01,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.coalesce_s = coalesce_s
        self.eos_token_ids = eos_token_ids
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.exact_head = ExactHead(model)
        self.stats = {"forward_passes": 0, "decode_steps": 0, "decoded_rows": 0, "max_batch": 0}
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._pending: list[GenerationRequest] = []
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # ---- public -------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> Future:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sgl-adaptive-engine", daemon=True)
                self._thread.start()
        self._queue.put(req)
        return req.future

    def shutdown(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)

    # ---- worker loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._rows and not self._pending:
                    first = self._queue.get()
                    if first is None:
                        return
                    self._pending.append(first)
                    if not self._coalesce():
                        return
                elif not self._drain():
                    return
                self._admit()
                if self._rows:
                    try:
                        self._decode_step()
                    except Exception as exc:  # fail the batch, keep serving
                        self._fail_all(exc)

    def _coalesce(self) -> bool:
        """Wait briefly for requests that arrive together (fork threads submit within milliseconds)."""
        deadline = time.perf_counter() + 5 * self.coalesce_s
        while time.perf_counter() < deadline:
            try:
                req = self._queue.get(timeout=self.coalesce_s)
            except queue.Empty:
                return True
            if req is None:
                return False
            self._pending.append(req)
        return True

    def _drain(self) -> bool:
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return True
            if req is None:
                return False
            self._pending.append(req)

    # ---- admission (prefill) ------------------------------------------------------------------
    def _admit(self) -> None:
        computed: dict[tuple[int, ...], _Prefilled] = {}
        new_rows: list[tuple[_Row, KV]] = []
        while self._pending and len(self._rows) + len(new_rows) < self.max_batch_size:
            req = self._pending.pop(0)
            if req.future.cancelled():
                continue
            try:
                key = tuple(req.ids)
                if key in computed and req.input_logprob_start is None:
                    done = computed[key]
                    cached, input_lp = len(req.ids) - 1, None  # counted as the server would: one new token
                else:
                    done = computed[key] = self._prefill(req)
                    cached, input_lp = done.cached, done.input_logprobs
                row = _Row(req=req, cached=cached, length=len(req.ids), input_logprobs=input_lp)
                if req.max_new_tokens <= 0:
                    self._complete(row, {"type": "length", "length": 0})
                    continue
                reason = self._append_token(row, done.logits[None, :], hidden=done.hidden)
                if reason is not None:
                    self._complete(row, reason)
                else:
                    new_rows.append((row, done.kv))
            except Exception as exc:
                if not req.future.done():
                    req.future.set_exception(exc)
        if new_rows:
            try:
                self._merge(new_rows)
            except Exception as exc:  # never leave a caller waiting on a future nobody will resolve
                for row, _ in new_rows:
                    if not row.req.future.done():
                        row.req.future.set_exception(exc)

    def _prefill(self, req: GenerationRequest) -> _Prefilled:
        ids = req.ids
        entry, cached = self.prefix_cache.match(ids)
        cached = min(cached, len(ids) - 1)
        if req.input_logprob_start is not None:
            cached = max(0, min(cached, req.input_logprob_start - 1))
        past = None
        if entry is not None and cached > 0:
            past = DynamicCache(
                ddp_cache_data=[(k[None, :, :cached], v[None, :, :cached]) for k, v in entry.kv],
                config=self.model.config,
            )
        new = torch.tensor([ids[cached:]], device=self.device)
        positions = torch.arange(cached, len(ids), device=self.device)[None, :]
        keep = 0 if req.input_logprob_start is not None else 1
        out = self.model(
            input_ids=new, past_key_values=past, position_ids=positions, use_cache=True, logits_to_keep=keep
        )
        self.stats["forward_passes"] += 1
        kv = [(layer.keys[0].clone(), layer.values[0].clone()) for layer in out.past_key_values.layers]
        self.prefix_cache.insert(ids, kv)
        logits = out.logits[0].float()
        input_lp = None
        if req.input_logprob_start is not None:
            logprobs = torch.log_softmax(logits, dim=-1)
            input_lp = []
            for t in range(max(req.input_logprob_start, 1), len(ids)):
                input_lp.append((float(logprobs[t - 1 - cached, ids[t]]), ids[t], self._piece(ids[t])))
        hidden = self.exact_head.last_hidden()
        return _Prefilled(kv, logits[-1], None if hidden is None else hidden[0].clone(), cached, input_lp)

    # ---- the running batch --------------------------------------------------------------------
    def _merge(self, new_rows: list[tuple[_Row, KV]]) -> None:
        """Add rows to the running batch, left-padding every row's KV to the longest."""
        old = [] if self._cache is None else [(layer.keys, layer.values) for layer in self._cache.layers]
        width = max([row.length for row, _ in new_rows] + [self._width()])
        layers = []
        n_layers = len(new_rows[0][1])
        for i in range(n_layers):
            keys, values = [], []
            if old:
                keys.append(_left_pad(old[i][0], width))
                values.append(_left_pad(old[i][1], width))
            for _, kv in new_rows:
                keys.append(_left_pad(kv[i][0][None], width))
                values.append(_left_pad(kv[i][1][None], width))
            layers.append((torch.cat(keys), torch.cat(values)))
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self._rows.extend(row for row, _ in new_rows)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(self._rows))

    def _width(self) -> int:
        return 0 if self._cache is None else self._cache.layers[0].keys.shape[-2]

    def _decode_step(self) -> None:
        rows = self._rows
        width = self._width() + 1
        lengths = torch.tensor([r.length for r in rows], device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] >= (width - 1 - lengths)[:, None]).long()
        tokens = torch.tensor([[r.out_ids[-1]] for r in rows], device=self.device)
        out = self.model(
            input_ids=tokens,
            past_key_values=self._cache,
            attention_mask=mask,
            position_ids=lengths[:, None],
            use_cache=True,
        )
        self._cache = out.past_key_values
        self.stats["forward_passes"] += 1
        self.stats["decode_steps"] += 1
        self.stats["decoded_rows"] += len(rows)
        for r in rows:
            r.length += 1
        logits = out.logits[:, -1, :].float()
        hidden = self.exact_head.last_hidden()
        finished: list[int] = []
        next_ids = sample_next(logits, [r.req.sampling for r in rows])
        for i, r in enumerate(rows):
            row_hidden = None if hidden is None else hidden[i]
            reason = self._append_token(r, logits[i : i + 1], int(next_ids[i]), hidden=row_hidden)
            if reason is not None:
                self._complete(r, reason, batch_index=i)
                finished.append(i)
        if finished:
            self._remove(finished)

    def _remove(self, indices: list[int]) -> None:
        keep = [i for i in range(len(self._rows)) if i not in set(indices)]
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = None
            return
        width = max(r.length for r in self._rows)
        index = torch.tensor(keep, device=self.device)
        layers = [
            (layer.keys[index, :, -width:], layer.values[index, :, -width:]) for layer in self._cache.layers
        ]
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _fail_all(self, exc: Exception) -> None:
        for r in self._rows:
            if not r.req.future.done():
                r.req.future.set_exception(exc)
        self._rows, self._cache = [], None

    # ---- tokens, stops and results ------------------------------------------------------------
    def _append_token(
        self, row: _Row, logits: torch.Tensor, token: int | None = None, hidden: torch.Tensor | None = None
    ) -> dict | None:
        """Sample (unless given) and record the next token of ``row``; return a finish reason or None.
        ``hidden`` (the head's input at this position) makes the requested token ids' logprobs exact."""
        req = row.req
        eos = self.eos_token_ids | req.stop_token_ids
        if len(row.out_ids) < req.min_new_tokens and not req.ignore_eos and eos:
            logits = logits.clone()
            logits[0, list(eos)] = float("-inf")
            token = None
        if token is None:
            token = int(sample_next(logits, [req.sampling])[0])
        row.out_ids.append(token)
        req.sampling.counts[token] += 1
        if req.return_logprob:
            self._record_logprobs(row, logits[0], token, hidden)
        if not req.ignore_eos and token in eos and len(row.out_ids) > req.min_new_tokens:
            return {"type": "stop", "matched": token}
        hit = self._stop_hit(row) if req.stop else None
        if hit is not None:
            return {"type": "stop", "matched": hit}
        if len(row.out_ids) >= req.max_new_tokens:
            return {"type": "length", "length": len(row.out_ids)}
        return None

    def _record_logprobs(
        self, row: _Row, logits: torch.Tensor, token: int, hidden: torch.Tensor | None
    ) -> None:
        """Log-probabilities of the model's own distribution (temperature 1, before any sampling filter) of the
        chosen token, the top ``top_logprobs_num`` tokens and the requested ids, as entries
        ``(logprob, token_id, text or None)``."""
        piece = self._piece if row.req.return_text_in_logprobs else _no_text
        logprobs = torch.log_softmax(logits, dim=-1)
        row.token_logprobs.append((float(logprobs[token]), token, piece(token)))
        if row.req.top_logprobs_num:
            values, ids = torch.topk(logprobs, row.req.top_logprobs_num)
            row.top_logprobs.append(
                [
                    (float(v), int(i), piece(int(i)))
                    for v, i in zip(values.tolist(), ids.tolist(), strict=True)
                ]
            )
        if row.req.token_ids_logprob:
            ids = row.req.token_ids_logprob
            if hidden is not None:  # fp32 logits of these ids, against the (rounded) normaliser
                values = self.exact_head.logits(hidden, ids) - torch.logsumexp(logits, dim=-1)
            else:
                values = logprobs[list(ids)]
            row.ids_logprobs.append([(float(v), i, piece(i)) for v, i in zip(values, ids, strict=True)])

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _stop_hit(self, row: _Row) -> str | None:
        longest = max(len(s) for s in row.req.stop)
        tail = self._decode(row.out_ids[-(longest + 8) :])
        hits = [s for s in row.req.stop if s and s in tail]
        return hits[0] if hits else None

    def _complete(self, row: _Row, reason: dict, batch_index: int | None = None) -> None:
        req = row.req
        eos = self.eos_token_ids | req.stop_token_ids
        text_ids: list[int] | None = [t for t in row.out_ids if req.ignore_eos or t not in eos]
        text = self._decode(text_ids)
        if reason["type"] == "stop" and isinstance(reason.get("matched"), str):
            text = text[: text.index(reason["matched"])] if reason["matched"] in text else text
            text_ids = _ids_for_prefix(self._decode, text_ids, text)
        if batch_index is not None:  # cache the KV of prompt + fed outputs
            fed = row.length
            layers = self._cache.layers
            kv = [
                (lay.keys[batch_index, :, -fed:].clone(), lay.values[batch_index, :, -fed:].clone())
                for lay in layers
            ]
            self.prefix_cache.insert((req.ids + row.out_ids)[:fed], kv)
        meta: dict[str, Any] = {
            "id": f"local-{next(_ids)}",
            "finish_reason": reason,
            "prompt_tokens": len(req.ids),
            "completion_tokens": len(row.out_ids),
            "cached_tokens": row.cached,
            "e2e_latency": time.perf_counter() - req.submitted,
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = row.token_logprobs
            if req.top_logprobs_num:
                meta["output_top_logprobs"] = row.top_logprobs
            if req.token_ids_logprob:
                meta["output_token_ids_logprobs"] = row.ids_logprobs
        if row.input_logprobs is not None:
            meta["input_token_logprobs"] = row.input_logprobs
        if not req.future.done():
            req.future.set_result(GenerationOutput(text=text, text_ids=text_ids, meta_info=meta))


def _no_text(token: int) -> None:
    return None


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad [batch, heads, seq, dim] with zeros to ``width`` positions."""
    missing = width - t.shape[-2]
    return t if missing <= 0 else torch.nn.functional.pad(t, (0, 0, missing, 0))


def _ids_for_prefix(decode: Any, ids: list[int], text: str) -> list[int] | None:
    """The shortest prefix of ``ids`` that decodes exactly to ``text`` (None if no prefix does)."""
    for k in range(len(ids) + 1):
        if decode(ids[:k]) == text:
            return ids[:k]
    return None
