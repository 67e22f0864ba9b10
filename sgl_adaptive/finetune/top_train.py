"""``finetune top``: train the top ``k`` blocks (LoRA) and the output head's Yes/No rows from the
activation cache, on two CPU cores.

Exact, not an approximation: the blocks below ``L - k`` are frozen, so the state entering block ``L - k``
(``activation_cache``) is what the whole model would compute there whatever is trained. Each step runs
a prompt's packed tree (``packing``) through the trained blocks. The top block is needed in full only
where a loss reads its output: the answer positions, and the response positions the drift term samples.
Every other node contributes only its key and value, so the top block costs two small projections per
token (``TopStack.top_block``). With ``k = 1`` one epoch over the 342-prompt data is a few minutes.

The loss is the answer token's, with the paired target (``soft_labels``: P(win or tie) against another
sample, the paper's) or the hard label, plus ``kl_weight`` × KL(base ‖ model) of the next-token
distribution at ``drift_positions`` random response positions per full response (the base is the same
model with the adapter off). A non-finite loss or gradient stops with a one-line error before the
optimizer applies it, and nothing is exported. The adapter (LoRA on the top ``k`` blocks, the two head
rows as PEFT trainable tokens) is written in PEFT's format, which ``model_store.merge_adapter`` merges
into a plain checkpoint that an unmodified SGLang server loads.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.activation_cache import ActivationCache, frozen_forward, layer_count
from sgl_adaptive.finetune.labels import KEEP_LABEL, RETRY_LABEL
from sgl_adaptive.finetune.packing import PackedTree, tree_attention
from sgl_adaptive.finetune.train import LORA_TARGETS, _diverged, non_finite_gradients, one_token_loss


@dataclass(frozen=True)
class TopSettings:
    """What is trained and how; the defaults are this module's CPU recipe for the 0.5B model."""

    k: int = 1
    """Top blocks trained (LoRA); at most the cache's ``k``."""
    lora_r: int = 8
    lora_alpha: int = 16
    head_rows: bool = True
    """Also train the output head's rows of the "No" and "Yes" answer tokens (untied in the 0.5B)."""
    lr: float = 5e-4
    epochs: float = 2.0
    prompts_per_step: int = 4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    soft_labels: bool = True
    """True: the paired target P(win or tie) (the paper's); False: the hard label."""
    kl_weight: float = 0.1
    drift_positions: int = 4
    """Response positions per full response at which the drift term is read, drawn anew each step."""
    budgets: tuple[str, ...] | None = None
    """Train on these truncation budgets only ("full" and token counts; None: all)."""
    seed: int = 0
    logging_steps: int = 20


def _rotate_half(x: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _budget_name(example: dict[str, Any]) -> str:
    return "full" if example.get("truncated_tokens") is None else str(example["truncated_tokens"])


class TopStack:
    """The trainable top of a causal LM, run from an activation cache.

    ``entering(n)`` is the state entering block ``L - k`` of prompt ``n`` (read from the cache, through the
    frozen blocks between the cache's layer and ``L - k`` when ``k`` is smaller than the cache's; memoised
    in ``memo``, which may be shared between stacks of the same base, e.g. across folds)."""

    def __init__(
        self,
        model: Any,
        cache: ActivationCache,
        settings: TopSettings,
        encoder: Any,
        memo: dict[int, Any] | None = None,
    ) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        self.cache, self.settings, self.encoder = cache, settings, encoder
        self.layers = layer_count(model)
        if cache.manifest["layers"] != self.layers:
            raise UserError(
                f"the cache is of a {cache.manifest['layers']}-layer model, this one has {self.layers}"
            )
        if not 1 <= settings.k <= cache.k:
            raise UserError(
                f"--k must be within [1, {cache.k}] (the cache holds the state entering block "
                f"{self.layers - cache.k})"
            )
        self.first = self.layers - settings.k
        self.no_id, self.yes_id = encoder.target_id(KEEP_LABEL), encoder.target_id(RETRY_LABEL)
        config = LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(LORA_TARGETS),
            layers_to_transform=list(range(self.first, self.layers)),
            trainable_token_indices={"lm_head": [self.no_id, self.yes_id]} if settings.head_rows else None,
        )
        self.model = get_peft_model(model, config)
        for (
            param
        ) in self.model.parameters():  # fp32 master weights: a bf16 row would round small updates away
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        self.base = self.model.get_base_model()
        self.memo = memo if memo is not None else {}
        self.answer_ids = [*encoder.keep_ids, *encoder.retry_ids]
        self.answer_ids += [t for t in encoder.targets.values() if t not in self.answer_ids]

    # --- forward -----------------------------------------------------------------------------------

    def entering(self, n: int, shard: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any], PackedTree]:
        """(state entering block ``L - k`` ``[N, d]``, the shard, its tree) of cached prompt ``n``."""
        if shard is None:
            shard = self.cache.load(n, states=n not in self.memo and self.first == self.layers - self.cache.k)
        tree = self.cache.tree(shard)
        if n in self.memo:
            return self.memo[n], shard, tree
        device = next(self.model.parameters()).device
        dtype = next(self.base.model.layers[0].parameters()).dtype
        start = self.layers - self.cache.k
        derived = self.cache.load_derived(n, self.settings.k) if start < self.first else None
        if derived is not None:
            hidden = derived.to(device=device, dtype=dtype)
        else:
            if "hidden" not in shard:
                shard = self.cache.load(n)
            hidden = shard["hidden"].to(device=device, dtype=dtype)
            if start < self.first:
                hidden = frozen_forward(self.base, tree, hidden, start, self.first)
        self.memo[n] = hidden
        return hidden, shard, tree

    def top_block(self, layer: Any, hidden: Any, tree: PackedTree, rotary: Any, query: Sequence[int]) -> Any:
        """``layer`` applied at the ``query`` nodes only: every node gives its key and value, only the query
        nodes their query, attention output and MLP. Equal to the full layer's output at those nodes."""
        import torch
        import torch.nn.functional as F

        attn = layer.self_attn
        heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        dim = attn.head_dim
        n = hidden.shape[0]
        q_index = torch.tensor(list(query), dtype=torch.long, device=hidden.device)
        cos, sin = rotary[0][0], rotary[1][0]  # [N, dim]
        x = layer.input_layernorm(hidden)
        keys = attn.k_proj(x).view(n, kv_heads, dim).transpose(0, 1)
        values = attn.v_proj(x).view(n, kv_heads, dim).transpose(0, 1)
        queries = attn.q_proj(x[q_index]).view(len(query), heads, dim).transpose(0, 1)
        keys = keys * cos + _rotate_half(keys) * sin
        queries = queries * cos[q_index] + _rotate_half(queries) * sin[q_index]
        groups = heads // kv_heads
        keys, values = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)
        mask = torch.zeros(len(query), n, dtype=torch.bool, device=hidden.device)
        for row, node in enumerate(query):
            mask[row, tree.path(node)] = True
        out = F.scaled_dot_product_attention(
            queries[None], keys[None], values[None], attn_mask=mask[None, None], scale=attn.scaling
        )[0]
        h = hidden[q_index] + attn.o_proj(out.transpose(0, 1).reshape(len(query), heads * dim))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def final_hidden(self, hidden: Any, tree: PackedTree, query: Sequence[int]) -> Any:
        """The head's input (final-normed state) at the ``query`` nodes, from the state entering ``L - k``."""
        import torch

        body = self.base.model
        pos = torch.tensor([tree.positions], device=hidden.device)
        rotary = body.rotary_emb(hidden[None], pos)
        h = hidden[None]
        if self.first < self.layers - 1:
            with tree_attention(self.base, tree):
                for layer in body.layers[self.first : self.layers - 1]:
                    h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rotary)
        return body.norm(self.top_block(body.layers[self.layers - 1], h[0], tree, rotary, query))

    def _head_parts(self) -> tuple[Any, Any, Any]:
        """(the head's frozen weight, the trained token ids or None, their trained rows or None)."""
        head = self.base.lm_head
        adapter = getattr(head, "token_adapter", None)  # PEFT's trainable-tokens wrapper
        if adapter is None:
            return head.weight, None, None
        name = adapter.active_adapters[0]
        return adapter.base_layer.weight, adapter.token_indices[name], adapter.trainable_tokens_delta[name]

    def head(self, final: Any, base: bool = False) -> Any:
        """Logits at ``final`` (``[Q, d]``): the frozen head, with the trained rows in place unless
        ``base``. Computed here rather than by PEFT's wrapper, which copies the whole head matrix to
        substitute two rows (a 272 MB copy per forward on the 0.5B)."""
        import torch
        import torch.nn.functional as F

        weight, ids, rows = self._head_parts()
        logits = F.linear(final, weight)
        if ids is None or base:
            return logits
        index = torch.tensor(ids, device=final.device)
        return logits.index_copy(-1, index, final @ rows.to(final.dtype).T)

    # --- loss and scores ---------------------------------------------------------------------------

    def _trained_rows(self, shard: dict[str, Any]) -> list[int]:
        wanted = self.settings.budgets
        rows = []
        for row, i in enumerate(shard["examples"]):
            ex = self.cache.examples[i]
            if ex["label"] in (KEEP_LABEL, RETRY_LABEL) and (wanted is None or _budget_name(ex) in wanted):
                rows.append(row)
        return rows

    def _drift_nodes(self, shard: dict[str, Any], tree: PackedTree, rng: random.Random) -> list[int]:
        nodes: list[int] = []
        for row, i in enumerate(shard["examples"]):
            if self.cache.examples[i].get("truncated_tokens") is not None:
                continue
            start, end = int(shard["response_start"][row]), int(shard["response_end"][row])
            candidates = list(range(max(start - 1, 0), end - 1))  # position p predicts token p + 1
            if not candidates:
                continue
            path = tree.path(tree.ends[row])
            picks = rng.sample(candidates, min(self.settings.drift_positions, len(candidates)))
            nodes += [path[p] for p in picks]
        return nodes

    def loss(self, n: int, rng: random.Random) -> tuple[Any, dict[str, float]]:
        """Prompt ``n``'s loss: the answer token's, mean over its trained examples, plus the drift term."""
        import torch

        hidden, shard, tree = self.entering(n)
        rows = self._trained_rows(shard)
        if not rows:
            return None, {}
        drift = self._drift_nodes(shard, tree, rng) if self.settings.kl_weight > 0 else []
        answer_nodes = [tree.ends[r] for r in rows]
        logits = self.head(self.final_hidden(hidden, tree, answer_nodes + drift))
        examples = [self.cache.examples[shard["examples"][r]] for r in rows]
        targets = torch.tensor([self.encoder.target_id(ex["label"]) for ex in examples])
        soft = torch.tensor([float(ex["soft_no"]) for ex in examples]) if self.settings.soft_labels else None
        answer_loss, _ = one_token_loss(logits[: len(rows)], targets, (self.no_id, self.yes_id), soft)
        loss = answer_loss.mean()
        parts = {"answer": float(loss.detach())}
        if drift:
            with torch.no_grad(), self.model.disable_adapter():
                teacher = self.head(self.final_hidden(hidden, tree, drift), base=True)
            t_logp = torch.log_softmax(teacher.float(), -1)
            s_logp = torch.log_softmax(logits[len(rows) :].float(), -1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            loss = loss + self.settings.kl_weight * kl
            parts["kl"] = float(kl.detach())
        return loss, parts

    def answer_rows(self) -> Any:
        """The head's current rows of the answer tokens (trained rows included), in fp32."""
        weight, ids, rows = self._head_parts()
        out = weight[self.answer_ids].float()
        for j, token in enumerate(self.answer_ids):
            if ids is not None and token in ids:
                out[j] = rows[ids.index(token)].float()
        return out

    def scores(self, n: int) -> list[Any]:
        """``ExampleScore`` of prompt ``n``'s examples (cache order), the answer logits in fp32."""
        import torch

        from sgl_adaptive.finetune.scoring import answer_scores

        hidden, shard, tree = self.entering(n)
        with torch.no_grad():
            final = self.final_hidden(hidden, tree, tree.ends)
            logits = self.head(final).float()
            exact = _Rows(self.answer_ids, self.answer_rows())
        return answer_scores(
            self.encoder, logits, [self.cache.examples[i] for i in shard["examples"]], exact, final
        )


class _Rows:
    """``ExactHead.logits`` over given fp32 head rows (what ``scoring.answer_scores`` asks of it)."""

    def __init__(self, ids: Sequence[int], rows: Any) -> None:
        self.column = {t: j for j, t in enumerate(ids)}
        self.rows = rows

    def logits(self, hidden: Any, ids: Sequence[int]) -> Any:
        return hidden.float() @ self.rows[[self.column[t] for t in ids]].T


def train_stack(
    stack: TopStack,
    prompts: Sequence[int],
    *,
    log: Callable[[str], None] = print,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``stack`` on the cached prompts ``prompts``; returns the run's figures. Stops with
    ``TrainingDivergedError`` (nothing applied) on a non-finite loss or gradient."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    s = stack.settings
    if not prompts:
        raise UserError("no prompts to train on")
    params = [p for p in stack.model.parameters() if p.requires_grad]
    torch.manual_seed(s.seed)
    rng = random.Random(s.seed)
    order: list[int] = []
    while len(order) < math.ceil(len(prompts) * s.epochs):
        epoch = list(prompts)
        rng.shuffle(epoch)
        order += epoch
    order = order[: math.ceil(len(prompts) * s.epochs)]
    steps = math.ceil(len(order) / s.prompts_per_step)
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(s.warmup_ratio * steps), steps)
    stack.model.train()
    start, window, history = time.monotonic(), [], []
    for step in range(steps):
        chunk = order[step * s.prompts_per_step : (step + 1) * s.prompts_per_step]
        optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        for n in chunk:
            loss, parts = stack.loss(n, rng)
            if loss is None:
                continue
            if not bool(torch.isfinite(loss.detach())):
                raise _diverged("loss", step + 1, f" ({float(loss.detach())}) on cached prompt {n}")
            (loss / len(chunk)).backward()
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value / len(chunk)
        bad = non_finite_gradients(stack.model)
        if bad:
            raise _diverged("gradient", step + 1, f" in {len(bad)} tensor(s), e.g. {bad[0]}")
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        optimizer.step()
        schedule.step()
        window.append(parts_sum)
        if progress:
            progress(len(chunk))
        if (step + 1) % s.logging_steps == 0 or step + 1 == steps:
            mean = {k: sum(w.get(k, 0.0) for w in window) / len(window) for k in window[0]}
            history.append({"step": step + 1, **mean})
            log(
                f"step {step + 1}/{steps}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in mean.items())
                + f", {time.monotonic() - start:.0f} s"
            )
            window = []
    stack.model.eval()
    return {"steps": steps, "prompts": len(prompts), "train_s": time.monotonic() - start, "history": history}


def score_prompts(
    stack: TopStack, prompts: Sequence[int], progress: Callable[[int], None] | None = None
) -> dict:
    """Example index -> ``ExampleScore`` for the cached prompts ``prompts``."""
    out = {}
    for n in prompts:
        shard_examples = stack.cache.groups[n]
        for i, score in zip(shard_examples, stack.scores(n), strict=True):
            out[i] = score
        if progress:
            progress(1)
    return out


def load_base(model_path: str, dtype: Any = None, device: str | None = None) -> tuple[Any, Any]:
    """(model, encoder): the base model the cache was built from, frozen."""
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm

    model, tokenizer = load_causal_lm(model_path, device=device or "cpu", dtype=dtype)
    model.requires_grad_(False)
    return model, SelfEvalEncoder(tokenizer)


def check_cache_model(cache: ActivationCache, model_path: str) -> None:
    """One-line error when ``model_path`` is not the model the cache was built from."""
    from sgl_adaptive.finetune.activation_cache import model_sha256

    if model_sha256(model_path) != cache.manifest["model_sha256"]:
        raise UserError(f"{cache.root} was cached from another model than {model_path} (sha256 differs)")


def cross_validate(
    base: Any,
    encoder: Any,
    cache: ActivationCache,
    settings: TopSettings,
    *,
    folds: int = 5,
    seed: int = 0,
    train_prompts: int | None = None,
    memo: dict[int, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Out-of-fold scores: for each fold (prompts grouped, ``folds.split_folds``) a fresh adapter trained
    on the other folds' prompts (the first ``train_prompts`` of them in hash order when given: the
    learning curve) scores the fold's prompts. Returns ``{"scores": [ExampleScore per cache example],
    "folds": [...figures]}``; uncached prompts are left out."""
    from sgl_adaptive.finetune.folds import prompt_hash, split_folds

    cached = cache.complete()
    ids = cache.prompt_ids
    by_id = {ids[n]: n for n in cached}
    fold_ids = split_folds([ids[n] for n in cached], folds, seed)
    memo = memo if memo is not None else {}
    scores: dict[int, Any] = {}
    figures = []
    for f, test_ids in enumerate(fold_ids):
        train = [by_id[i] for fold in fold_ids[:f] + fold_ids[f + 1 :] for i in fold]
        if train_prompts:  # the learning curve: a fixed subset, the same whatever the fold
            train = sorted(train, key=lambda n: prompt_hash(ids[n], seed + 1))[:train_prompts]
        stack = TopStack(copy.deepcopy(base), cache, settings, encoder, memo)
        log(f"fold {f + 1}/{folds}: training on {len(train)} prompts, scoring {len(test_ids)}")
        run = train_stack(stack, train, log=log)
        scores.update(score_prompts(stack, [by_id[i] for i in test_ids]))
        figures.append(
            {"fold": f, **{k: v for k, v in run.items() if k != "history"}, "last": run["history"][-1:]}
        )
    return {"scores": [scores.get(i) for i in range(len(cache.examples))], "folds": figures}


def export_adapter(stack: TopStack, out: Path, card: dict[str, Any]) -> Path:
    """Write the adapter (PEFT format) and its card to ``out``; refuses non-finite weights."""
    import json

    from sgl_adaptive.weights import check_finite

    state = {k: v for k, v in stack.model.state_dict().items() if "lora_" in k or "trainable_tokens" in k}
    check_finite(state, "the trained adapter")
    out.mkdir(parents=True, exist_ok=True)
    stack.model.save_pretrained(out)
    (out / "training.json").write_text(
        json.dumps({"settings": asdict(stack.settings), **card}, indent=2) + "\n"
    )
    return out
