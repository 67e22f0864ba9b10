"""``finetune cache``: the frozen lower layers run once over the packed data, their output stored.

Training the top ``k`` blocks needs, for every token of a prompt's packed tree (``packing.py``), only
the hidden state entering block ``L - k``: the layers below are frozen, so that state does not depend on
what is trained, and training from it is exact. One forward per prompt writes

- ``hidden`` ``[N, d]``: the state entering block ``L - k`` at every node of the tree (in the model's
  dtype: bf16 where the CPU has it);
- ``answer_states`` ``[E, L - k + 1, d]``: at the node that predicts each example's answer token, the
  state entering every block ``0 .. L - k`` (``hidden_states[j]`` in transformers' numbering; index 0 is
  the embedding), for the probe curve over layers;
- the tree (``input_ids``, ``positions``, ``parents``, ``ends``) and per example its response's token range.

Layout of ``DIR``: ``manifest.json`` (the base model's sha256, ``k``, the layer count, the data's hash and
the layout version), ``examples.jsonl`` (the examples, in cache order, each with its ``prompt_id``) and
``prompts/<n>.safetensors``, one per prompt, written atomically: a rerun skips the prompts already
there, so an interrupted run resumes. A cache whose manifest does not match the model or the data is a
one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.packing import PackedTree, build_tree, group_by_prompt, tree_attention, tree_inputs

FORMAT = "sgl-adaptive-activation-cache/1"
MANIFEST = "manifest.json"
EXAMPLES = "examples.jsonl"
EXAMPLE_FIELDS = (
    "prompt_id",
    "sample",
    "truncated_tokens",
    "label",
    "soft_no",
    "reward",
    "wins",
    "ties",
    "losses",
    "finished",
    "prompt",
    "text",
    "response",
)
"""What a cached example keeps of a ``finetune data`` example (enough for every report)."""


def model_sha256(model_path: str | Path) -> str:
    """sha256 over the model folder's weight files (names and contents, in name order)."""
    folder = Path(model_path)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise UserError(f"{folder} holds no weight files (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def data_sha256(examples: Sequence[dict[str, Any]]) -> str:
    """sha256 of what the cache depends on: every example's fields in ``EXAMPLE_FIELDS``, in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.get(k) for k in EXAMPLE_FIELDS], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def load_examples(data_dir: Path) -> list[dict[str, Any]]:
    """All examples of a ``finetune data`` folder (train and held-out), grouped by prompt."""
    from sgl_adaptive.data import read_jsonl

    files = [data_dir / name for name in ("train.jsonl", "heldout.jsonl") if (data_dir / name).is_file()]
    if not files:
        raise UserError(f"{data_dir} has no train.jsonl or heldout.jsonl (run `sgl-adaptive finetune data`)")
    examples = [{k: ex.get(k) for k in EXAMPLE_FIELDS} for f in files for ex in read_jsonl(f)]
    if not examples:
        raise UserError(f"{data_dir} holds no examples")
    return [examples[i] for group in group_by_prompt(examples) for i in group]


def layer_count(model: Any) -> int:
    config = getattr(model.config, "text_config", None) or model.config
    return int(config.num_hidden_layers)


def lower_forward(model: Any, tree: PackedTree, upto: int) -> tuple[Any, Any]:
    """Run the embedding and blocks ``0 .. upto - 1`` on the tree: (the state entering block ``upto`` at
    every node ``[N, d]``, the states entering blocks ``0 .. upto`` at the answer nodes ``[E, upto + 1,
    d]``). The blocks see exactly what they see inside the model's own forward."""
    import torch

    body = model.model
    device = next(model.parameters()).device
    inputs = tree_inputs(tree, device)
    ends = torch.tensor(tree.ends, dtype=torch.long, device=device)
    with torch.no_grad(), tree_attention(model, tree):
        hidden = body.embed_tokens(inputs["input_ids"])
        rotary = body.rotary_emb(hidden, inputs["position_ids"])
        at_ends = [hidden[0, ends]]
        for layer in body.layers[:upto]:
            hidden = layer(
                hidden,
                attention_mask=inputs["attention_mask"],
                position_ids=inputs["position_ids"],
                position_embeddings=rotary,
            )
            at_ends.append(hidden[0, ends])
    return hidden[0], torch.stack(at_ends, 1)


class ActivationCache:
    """A cache folder: its manifest, examples and per-prompt shards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        manifest = root / MANIFEST
        if not manifest.is_file():
            raise UserError(f"{root} is not an activation cache (no {MANIFEST}; run `finetune cache`)")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{manifest}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        from sgl_adaptive.data import read_jsonl

        self.examples = list(read_jsonl(root / EXAMPLES))
        self.groups = group_by_prompt(self.examples)

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def prompt_ids(self) -> list[str]:
        return [self.examples[g[0]]["prompt_id"] for g in self.groups]

    def shard_path(self, n: int) -> Path:
        return self.root / "prompts" / f"{n:05d}.safetensors"

    def complete(self) -> list[int]:
        """Indices of the prompts whose shard is written."""
        return [n for n in range(len(self.groups)) if self.shard_path(n).is_file()]

    def derived_path(self, n: int, k: int) -> Path:
        """Where ``derive_states`` keeps prompt ``n``'s state entering block ``L - k`` (for a smaller ``k``)."""
        return self.root / "prompts" / f"{n:05d}.k{k}.safetensors"

    def load_derived(self, n: int, k: int) -> Any | None:
        """Prompt ``n``'s state entering block ``L - k`` if ``derive_states`` wrote it, else None."""
        from safetensors.torch import load_file

        path = self.derived_path(n, k)
        return load_file(str(path))["hidden"] if path.is_file() else None

    def load(self, n: int, states: bool = True) -> dict[str, Any]:
        """Prompt ``n``'s tensors (``hidden``, ``answer_states``, ``input_ids``, ``positions``,
        ``parents``, ``ends``, ``response_start``, ``response_end``) and ``examples`` (its indices);
        ``states`` False reads only the tree and the ranges, not the two state tensors."""
        from safetensors import safe_open

        path = self.shard_path(n)
        if not path.is_file():
            raise UserError(f"prompt {n} of {self.root} is not cached yet (rerun `finetune cache`)")
        with safe_open(str(path), framework="pt") as f:
            names = [k for k in f.keys() if states or k not in ("hidden", "answer_states")]  # noqa: SIM118
            shard: dict[str, Any] = {k: f.get_tensor(k) for k in names}
        shard["examples"] = self.groups[n]
        return shard

    def tree(self, shard: dict[str, Any]) -> PackedTree:
        return PackedTree(
            shard["input_ids"].tolist(),
            shard["positions"].tolist(),
            shard["parents"].tolist(),
            shard["ends"].tolist(),
        )


def check_manifest(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    """One-line error when an existing cache was built from another model, data, k or layout."""
    for key, what in (
        ("format", "layout version"),
        ("model_sha256", "base model"),
        ("data_sha256", "data"),
        ("k", "k (top blocks)"),
        ("layers", "layer count"),
        ("selfeval_prompt", "self-evaluation prompt"),
    ):
        if old.get(key) != new.get(key):
            raise UserError(
                f"{root} was cached with another {what} ({old.get(key)!r} there, {new.get(key)!r} now): "
                "use another --out or delete it"
            )


def build_cache(
    model_path: str,
    data_dir: Path,
    out: Path,
    *,
    k: int,
    dtype: Any = None,
    device: str | None = None,
    limit: int | None = None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Cache the state entering block ``L - k`` for every prompt of ``data_dir`` (the first ``limit``
    prompts when given); resumes an interrupted run. Returns the manifest."""
    import torch
    from safetensors.torch import save_file

    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm

    examples = load_examples(data_dir)
    groups = group_by_prompt(examples)
    if limit is not None:
        examples = [examples[i] for g in groups[:limit] for i in g]
        groups = group_by_prompt(examples)
    model, tokenizer = load_causal_lm(model_path, device=device, dtype=dtype)
    layers = layer_count(model)
    if not 1 <= k < layers:
        raise UserError(f"--k must be within [1, {layers - 1}] (got {k})")
    encoder = SelfEvalEncoder(tokenizer)
    manifest = {
        "format": FORMAT,
        "model": model_path,
        "model_sha256": model_sha256(model_path),
        "data": str(data_dir),
        "data_sha256": data_sha256(examples),
        "k": k,
        "layers": layers,
        "hidden_size": int(model.config.hidden_size),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "selfeval_prompt": encoder.selfeval.prompt,
        "prompts": len(groups),
        "examples": len(examples),
    }
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        check_manifest(json.loads((out / MANIFEST).read_text()), manifest, out)
    else:
        _write_atomic(out / EXAMPLES, "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples))
        _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    cache = ActivationCache(out)
    (out / "prompts").mkdir(exist_ok=True)
    todo = [n for n in range(len(groups)) if not cache.shard_path(n).is_file()]
    if len(todo) < len(groups):
        log(f"resuming: {len(groups) - len(todo)} of {len(groups)} prompts already cached in {out}")
    advance = progress(len(todo)) if progress else None
    upto = layers - k
    start, nodes = time.monotonic(), 0
    for n in todo:
        group = [examples[i] for i in groups[n]]
        encoded = [encoder.prompt_ids_and_response(ex["prompt"], ex["text"]) for ex in group]
        tree = build_tree([ids for ids, _, _ in encoded])
        hidden, at_ends = lower_forward(model, tree, upto)
        tensors = {
            "hidden": hidden.contiguous(),  # in the model's dtype (bf16 on a CPU with native bf16)
            "answer_states": at_ends.contiguous(),
            "input_ids": torch.tensor(tree.input_ids, dtype=torch.int32),
            "positions": torch.tensor(tree.positions, dtype=torch.int32),
            "parents": torch.tensor(tree.parents, dtype=torch.int32),
            "ends": torch.tensor(tree.ends, dtype=torch.int32),
            "response_start": torch.tensor([s for _, s, _ in encoded], dtype=torch.int32),
            "response_end": torch.tensor([e for _, _, e in encoded], dtype=torch.int32),
        }
        if not bool(torch.isfinite(tensors["hidden"]).all()):
            raise UserError(
                f"non-finite hidden states for prompt {group[0]['prompt_id']!r}: the model is broken"
            )
        path = cache.shard_path(n)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        nodes += tree.size
        if advance:
            advance(1)
    elapsed = time.monotonic() - start
    if todo:
        log(
            f"cached {len(todo)} prompts ({nodes} tokens) in {elapsed:.0f} s ({nodes / max(elapsed, 1e-9):.0f} tok/s)"
        )
    return manifest


def frozen_forward(model: Any, tree: PackedTree, hidden: Any, start: int, stop: int) -> Any:
    """Blocks ``start .. stop - 1`` of ``model`` on the tree, from the state entering ``start`` ``[N, d]``."""
    import torch

    body = model.model
    pos = torch.tensor([tree.positions], device=hidden.device)
    rotary = body.rotary_emb(hidden[None], pos)
    with torch.no_grad(), tree_attention(model, tree):
        h = hidden[None]
        for layer in body.layers[start:stop]:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rotary)
    return h[0]


def derive_states(
    model: Any,
    cache: ActivationCache,
    k: int,
    *,
    follow: bool = False,
    idle_s: float = 600.0,
    progress: Callable[[int], Callable[[int], None]] | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Store, for every cached prompt, the state entering block ``L - k`` (``k`` < the cache's ``k``): the
    frozen blocks between run once here instead of in every training run. ``follow``: keep going while
    ``finetune cache`` is still writing prompts (stop once all are done, or after ``idle_s`` without a
    new one). Returns the prompts derived."""
    from safetensors.torch import save_file

    layers = int(cache.manifest["layers"])
    if not 1 <= k < cache.k:
        raise UserError(f"--derive must be within [1, {cache.k - 1}] for a cache of k = {cache.k}")
    start, stop = layers - cache.k, layers - k
    device = next(model.parameters()).device
    dtype = next(model.model.layers[0].parameters()).dtype
    advance = progress(len(cache.groups)) if progress else None
    done, last_new = 0, time.monotonic()
    while True:
        todo = [n for n in cache.complete() if not cache.derived_path(n, k).is_file()]
        for n in todo:
            shard = cache.load(n)
            hidden = frozen_forward(model, cache.tree(shard), shard["hidden"].to(device, dtype), start, stop)
            path = cache.derived_path(n, k)
            save_file({"hidden": hidden.contiguous()}, str(path.with_suffix(".tmp")))
            os.replace(path.with_suffix(".tmp"), path)
            done += 1
            last_new = time.monotonic()
            if advance:
                advance(1)
        everything_cached = len(cache.complete()) == len(cache.groups)
        if not follow or (
            everything_cached and all(cache.derived_path(n, k).is_file() for n in cache.complete())
        ):
            break
        if time.monotonic() - last_new > idle_s:
            log(f"no new cached prompt for {idle_s:.0f} s: stopping ({len(cache.complete())} cached)")
            break
        time.sleep(5)
    return done


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
