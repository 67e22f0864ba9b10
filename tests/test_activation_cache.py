"""The activation cache: what the lower layers give, resumed per prompt, refused for other data."""

from __future__ import annotations

import json

import pytest

from tests.test_packing import _examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def data_dir(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    examples = _examples(AutoTokenizer.from_pretrained(tiny_model_dir))
    out = tmp_path / "data"
    out.mkdir()
    (out / "train.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples[:30]))
    (out / "heldout.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples[30:]))
    return out


def test_cache_holds_the_model_states_and_resumes(tiny_model_dir, data_dir, tmp_path):
    import torch

    from sgl_adaptive.finetune.activation_cache import ActivationCache, build_cache
    from sgl_adaptive.finetune.packing import tree_inputs
    from sgl_adaptive.finetune.scoring import load_causal_lm

    out = tmp_path / "cache"
    manifest = build_cache(
        str(tiny_model_dir), data_dir, out, k=1, dtype=torch.float32, device="cpu", limit=1
    )
    assert manifest["prompts"] == 1 and ActivationCache(out).complete() == [0]
    with pytest.raises(Exception, match="another data"):  # the first prompt only: another data hash
        build_cache(str(tiny_model_dir), data_dir, out, k=1, dtype=torch.float32, device="cpu")
    out = tmp_path / "cache2"
    build_cache(str(tiny_model_dir), data_dir, out, k=1, dtype=torch.float32, device="cpu")
    cache = ActivationCache(out)
    assert cache.complete() == [0, 1] and len(cache.examples) == len(_examples_of(data_dir))
    first = cache.shard_path(0).stat().st_mtime_ns
    lines = []
    build_cache(str(tiny_model_dir), data_dir, out, k=1, dtype=torch.float32, device="cpu", log=lines.append)
    assert cache.shard_path(0).stat().st_mtime_ns == first and "2 of 2 prompts already cached" in lines[0]

    model, tokenizer = load_causal_lm(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    for n in cache.complete():
        shard = cache.load(n)
        tree = cache.tree(shard)
        with torch.no_grad():
            states = model(**tree_inputs(tree), output_hidden_states=True).hidden_states
        top = model.config.num_hidden_layers - cache.k
        assert torch.allclose(shard["hidden"], states[top][0], atol=1e-5)
        for j in range(top + 1):
            assert torch.allclose(shard["answer_states"][:, j], states[j][0, shard["ends"].long()], atol=1e-5)
        # the response range of each example points at its response tokens
        for row, i in enumerate(shard["examples"]):
            ex = cache.examples[i]
            path = tree.path(tree.ends[row])
            start, end = int(shard["response_start"][row]), int(shard["response_end"][row])
            ids = [tree.input_ids[p] for p in path[start:end]]
            assert tokenizer.decode(ids) == ex["text"]


def _examples_of(data_dir):
    return [
        line
        for name in ("train.jsonl", "heldout.jsonl")
        for line in (data_dir / name).read_text().splitlines()
    ]


def test_cache_refuses_another_model_and_bad_k(tiny_model_dir, data_dir, tmp_path):
    import torch

    from sgl_adaptive.errors import UserError
    from sgl_adaptive.finetune.activation_cache import build_cache

    out = tmp_path / "cache"
    build_cache(str(tiny_model_dir), data_dir, out, k=1, dtype=torch.float32, device="cpu", limit=1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="another base model"):
        build_cache(str(tiny_model_dir), data_dir, out, k=1, dtype=torch.float32, device="cpu", limit=1)
    with pytest.raises(UserError, match="--k must be within"):
        build_cache(str(tiny_model_dir), data_dir, tmp_path / "c3", k=2, dtype=torch.float32, device="cpu")


def test_derived_states_are_the_frozen_blocks_output(tmp_path):
    import torch
    from transformers import AutoTokenizer

    from sgl_adaptive.finetune.activation_cache import ActivationCache, build_cache, derive_states
    from sgl_adaptive.finetune.packing import tree_inputs
    from sgl_adaptive.finetune.scoring import load_causal_lm
    from sgl_adaptive.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", layers=3)
    data = tmp_path / "data"
    data.mkdir()
    examples = _examples(AutoTokenizer.from_pretrained(model_dir))
    (data / "train.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    build_cache(str(model_dir), data, tmp_path / "cache", k=2, dtype=torch.float32, device="cpu")
    cache = ActivationCache(tmp_path / "cache")
    model, _ = load_causal_lm(str(model_dir), device="cpu", dtype=torch.float32)
    assert derive_states(model, cache, 1) == 2 and derive_states(model, cache, 1) == 0  # once
    for n in cache.complete():
        tree = cache.tree(cache.load(n))
        with torch.no_grad():
            states = model(**tree_inputs(tree), output_hidden_states=True).hidden_states
        assert torch.allclose(cache.load_derived(n, 1), states[2][0], atol=1e-5)
    with pytest.raises(Exception, match="--derive must be within"):
        derive_states(model, cache, 2)
