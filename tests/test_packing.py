"""The packed tree forward scores every example as it scores alone."""

from __future__ import annotations

import numpy as np
import pytest

from sgl_adaptive.finetune.packing import build_tree, group_by_prompt, packed_token_counts, score_packed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tree_shares_prefixes_and_every_row_sees_itself():
    tree = build_tree([[1, 2, 3], [1, 2, 4, 5], [1, 2, 3], [7]])
    assert tree.size == 6  # 1 2 3 | 4 5 | 7
    assert tree.input_ids == [1, 2, 3, 4, 5, 7]
    assert tree.positions == [0, 1, 2, 2, 3, 0]
    assert tree.ends == [2, 4, 2, 5]
    assert [[tree.input_ids[n] for n in tree.path(end)] for end in tree.ends] == [
        [1, 2, 3],
        [1, 2, 4, 5],
        [1, 2, 3],
        [7],
    ]
    mask = tree.ancestor_mask()
    assert mask.diagonal().all()  # no query row is fully masked
    assert not np.triu(mask, 1).any()  # parents come first: the mask is causal
    assert mask[4].tolist() == [True, True, False, True, True, False]  # 5 sees 1 2 4 and itself, not 3
    assert mask[5].tolist() == [False] * 5 + [True]  # a second root sees nothing before it
    with pytest.raises(ValueError, match="empty"):
        build_tree([[1], []])


def _examples(tokenizer):
    """Two prompts, three samples each, cut at many budgets: some cuts fall inside multi-byte
    characters (é is 2 bytes, 🙂 is 4) and back off to an exact prefix (``truncate_response``)."""
    from sgl_adaptive.finetune.examples import make_examples
    from sgl_adaptive.finetune.labels import pairwise_labels

    records = [
        ("p1", "What is 12 + 30?", ["The answer is 42.", "Café 🙂 is 41 é é.", "🙂🙂 one two 🙂 é"]),
        ("p2", "Name a colour 🙂.", ["Blue, I think: bleu é 🙂.", "Red.", "Green 🙂🙂🙂 vert"]),
    ]
    out = []
    for pid, prompt, texts in records:
        samples = [
            {"index": i, "text": t, "tokens": 0, "finished": True, "reward": float(i == 0)}
            for i, t in enumerate(texts)
        ]
        record = {"id": pid, "prompt": prompt, "seed": 0, "samples": samples}
        labels = pairwise_labels([s["reward"] for s in samples], 0.5)
        out += make_examples(record, labels, range(1, 12), tokenizer, {})
    return out


def test_packed_scores_equal_one_example_at_a_time(tiny_model_dir):
    import torch

    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm, score_examples

    model, tokenizer = load_causal_lm(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    encoder = SelfEvalEncoder(tokenizer)
    examples = _examples(tokenizer)
    texts = [ex["text"] for ex in examples]
    assert any(any(ord(c) > 127 for c in t) for t in texts)
    # some budget cut inside a multi-byte character and backed off (two budgets give one text)
    assert any(
        a["text"] == b["text"] and a["truncated_tokens"] != b["truncated_tokens"]
        for a, b in zip(examples, examples[1:], strict=False)
    )
    seen = []
    packed = score_packed(model, encoder, examples, on_prompt=seen.append)
    alone = [score_examples(model, encoder, [ex])[0] for ex in examples]
    assert seen == [len(g) for g in group_by_prompt(examples)] and len(seen) == 2
    for p, a in zip(packed, alone, strict=True):
        assert p.score == pytest.approx(a.score, abs=1e-5)
        assert p.p_no == pytest.approx(a.p_no, abs=1e-5) and p.p_yes == pytest.approx(a.p_yes, abs=1e-5)
        assert p.loss == pytest.approx(a.loss, abs=1e-4)
    # the scores differ between examples: the test would notice a packed pass that read one position
    assert len({round(s.score, 6) for s in packed}) > len(examples) // 2
    counts = packed_token_counts(encoder, examples)
    assert counts["packed_tokens"] < counts["unpacked_tokens"] / 2


def test_packed_scores_of_a_bf16_model_use_the_exact_head(tiny_model_dir):
    import torch

    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm, score_examples

    model, tokenizer = load_causal_lm(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    encoder = SelfEvalEncoder(tokenizer)
    examples = _examples(tokenizer)[:12]
    packed = score_packed(model, encoder, examples)
    alone = score_examples(model, encoder, examples)
    # bf16 bodies round differently in a packed row, but the fp32 head keeps the scores close and distinct
    assert max(abs(p.score - a.score) for p, a in zip(packed, alone, strict=True)) < 2e-2
    assert len({s.score for s in packed}) > 6


def test_block_attention_runs_and_keeps_each_block_to_its_ancestors(tiny_model_dir, monkeypatch):
    import torch

    from sgl_adaptive.finetune import packing
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    encoder = SelfEvalEncoder(tokenizer)
    examples = _examples(tokenizer)
    group = group_by_prompt(examples)[0]
    tree = build_tree([encoder.prompt_ids(examples[i]["prompt"], examples[i]["text"]) for i in group])
    blocks = packing.attention_blocks(tree, rows=64)
    mask = tree.ancestor_mask()
    assert [b.start for b in blocks] == list(range(0, tree.size, 64))
    assert sum(len(b.keys) * (b.stop - b.start) for b in blocks) < mask.size / 2  # fewer scores than dense
    for b in blocks:  # no key an ancestor needs is missing, none of the others is there
        assert set(b.keys.tolist()) == set(np.flatnonzero(mask[b.start : b.stop].any(0)).tolist())
    calls = []
    real = packing._tree_attention_forward
    monkeypatch.setattr(
        packing, "_tree_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    score_packed(model, encoder, [examples[i] for i in group])
    assert len(calls) == model.config.num_hidden_layers
    assert model.config._attn_implementation != packing.ATTENTION  # restored after the forward
