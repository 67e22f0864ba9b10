"""Fine-tuning building blocks: pairwise labels with ties, truncation, the one-token loss mask, metrics."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from sgl_adaptive.finetune.examples import answer_targets, make_examples, parse_budgets, truncate_response
from sgl_adaptive.finetune.labels import default_tie_margin, pairwise_labels
from sgl_adaptive.finetune.metrics import auroc, brier


def counts(labels):
    return [(x.wins, x.ties, x.losses, x.label) for x in labels]


def test_verifier_labels_correct_never_beaten_and_all_wrong_ties():
    labels = pairwise_labels([1.0, 0.0, 0.0, 1.0], margin=0.5)
    assert counts(labels) == [(2, 1, 0, "No"), (0, 1, 2, "Yes"), (0, 1, 2, "Yes"), (2, 1, 0, "No")]
    assert labels[1].soft_no == pytest.approx(1 / 3) and labels[0].soft_no == 1.0
    # every sample wrong: nobody is better, so every one is "No" (the paper's relaxed ties)
    assert {x.label for x in pairwise_labels([0.0, 0.0, 0.0], 0.5)} == {"No"}


def test_reward_model_labels_use_the_tie_margin():
    rewards = [0.0, 0.05, 0.3]
    assert counts(pairwise_labels(rewards, 0.1)) == [(0, 1, 1, "Yes"), (0, 1, 1, "Yes"), (2, 0, 0, "No")]
    # a margin wider than every gap turns everything into ties
    assert counts(pairwise_labels(rewards, 0.5)) == [(0, 2, 0, "No")] * 3
    # exact ties: j must be better by MORE than the margin, so margin 0 keeps equal rewards as ties
    assert counts(pairwise_labels([1.0, 1.0], 0.0)) == [(0, 1, 0, "No")] * 2
    assert counts(pairwise_labels([1.0, 1.2], 0.2)) == [(0, 1, 0, "No")] * 2


def test_label_errors_and_default_margins():
    with pytest.raises(ValueError, match="at least two"):
        pairwise_labels([1.0], 0.5)
    with pytest.raises(ValueError, match="margin"):
        pairwise_labels([1.0, 0.0], -1)
    assert default_tie_margin([0, 1, 1], verifier=True) == 0.5
    assert default_tie_margin([1.0, 3.0], verifier=False) == pytest.approx(0.1)


def test_truncation_cuts_at_token_budgets(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "What is 12 + 30? The answer is 42. Then the total is one two three."
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 8
    for budget in (1, 4, 8):
        prefix = truncate_response(tok, text, budget)
        assert text.startswith(prefix) and len(prefix) < len(text)
        assert tok.encode(prefix, add_special_tokens=False) == ids[:budget]
    assert truncate_response(tok, text, len(ids)) is None
    # a cut inside a multi-byte character backs off to an exact prefix of the text
    accented = "é" * 12
    prefixes = [truncate_response(tok, accented, budget) for budget in range(1, 7)]
    assert all(p is not None and accented.startswith(p) and "\ufffd" not in p for p in prefixes)
    assert prefixes[0] == "" and prefixes[-1] == "é" * 3  # one byte per token here: 6 tokens = 3 characters


def test_make_examples_carry_the_full_label_and_budget(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long = "one two three four five six seven eight nine ten " * 3
    record = {
        "id": "p1",
        "prompt": "Q?",
        "seed": 7,
        "samples": [
            {"index": 0, "text": long, "tokens": 40, "finished": True, "reward": 1.0},
            {"index": 1, "text": "no", "tokens": 1, "finished": True, "reward": 0.0},
        ],
    }
    labels = pairwise_labels([1.0, 0.0], 0.5)
    examples = make_examples(record, labels, (4, 16), tok, {"model": "m"})
    assert [(e["sample"], e["truncated_tokens"], e["label"]) for e in examples] == [
        (0, None, "No"),
        (0, 4, "No"),
        (0, 16, "No"),
        (1, None, "Yes"),
    ]
    assert all(e["response"] == record["samples"][e["sample"]]["text"] for e in examples)
    assert examples[1]["text"] != long and long.startswith(examples[1]["text"])
    assert parse_budgets("64, 16,16") == (16, 64) and parse_budgets("") == ()
    with pytest.raises(ValueError):
        parse_budgets("16,x")


def test_answer_targets_are_the_bare_words(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    targets = answer_targets(tok)
    assert tok.decode([targets["No"]]) == "No" and tok.decode([targets["Yes"]]) == "Yes"


def brute_auroc(scores, positives):
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_and_brier():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5] * 4, [True, False, True, False]) == 0.5
    assert math.isnan(auroc([0.1, 0.2], [True, True]))
    rnd = random.Random(0)
    scores = [rnd.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(60)]
    labels = [rnd.random() < 0.4 for _ in range(60)]
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels))
    assert brier([1.0, 0.0, 0.5], [1.0, 1.0, 0.0]) == pytest.approx((0 + 1 + 0.25) / 3)


def test_one_token_loss_mask_matches_the_models_own_loss(tiny_model_dir):
    """The collator right-pads without an attention mask and gathers each row's answer position: the
    model's own causal-LM loss on the collator's labels equals ours, each row equals its solo run, and
    soft labels mix the two answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgl_adaptive.finetune.batching import HeadGather
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder
    from sgl_adaptive.finetune.train import OneTokenCollator, encode_examples, one_token_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    enc = SelfEvalEncoder(tok)
    examples = [
        {"prompt": "What is 1 + 2?", "text": "The answer is 3.", "label": "No", "soft_no": 1.0},
        {
            "prompt": "Hi",
            "text": "one two three four five six seven eight nine",
            "label": "Yes",
            "soft_no": 0.25,
        },
    ]
    features, dropped = encode_examples(examples, enc, 2048, with_response=True)
    assert dropped == 0
    batch = OneTokenCollator(tok.pad_token_id, with_response=True)(features)
    assert "attention_mask" not in batch and "position_ids" not in batch
    lengths = [len(f["input_ids"]) for f in features]
    assert lengths[0] != lengths[1]
    labels = batch["labels"]
    assert (labels != -100).sum(dim=1).tolist() == [1, 1]
    assert [labels[r, n - 1].item() for r, n in enumerate(lengths)] == [
        enc.target_id("No"),
        enc.target_id("Yes"),
    ]
    assert batch["targets"].tolist() == [enc.target_id("No"), enc.target_id("Yes")]
    assert batch["gather_index"][:, 0].tolist() == [n - 2 for n in lengths]
    # the KL positions of row 1 predict its nine response words, all before the answer position
    valid = batch["gather_valid"]
    assert valid[1, 1:].sum() >= 9 and bool((batch["gather_index"][valid] < max(lengths) - 1).all())

    with torch.no_grad(), HeadGather(model) as gather:
        hf = model(input_ids=batch["input_ids"], labels=labels).loss
        with gather.at(batch["gather_index"][:, :1]):
            logits = model(input_ids=batch["input_ids"], logits_to_keep=0).logits
        assert logits.shape[:2] == (2, 1)
        ours, _ = one_token_loss(logits[:, 0], batch["targets"], (0, 0))
        assert ours.mean().item() == pytest.approx(hf.item(), rel=1e-5)
        # each row alone gives the same per-row loss (right padding without a mask is invisible)
        for row, f in enumerate(features):
            solo = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, -2]
            expected = -torch.log_softmax(solo, -1)[f["input_ids"][-1]]
            assert ours[row].item() == pytest.approx(expected.item(), rel=1e-4)
        # soft labels: q = 1 is the hard "No" loss; q = 0.25 mixes in "Yes"
        no_id, yes_id = enc.target_id("No"), enc.target_id("Yes")
        soft, _ = one_token_loss(logits[:, 0], batch["targets"], (no_id, yes_id), batch["soft_no"])
        assert soft[0].item() == pytest.approx(ours[0].item(), rel=1e-5)  # soft target 1.0 == hard "No"
        assert soft[1].item() != pytest.approx(ours[1].item())


def test_lora_layers_adapt_only_the_last_layers(tiny_model_dir):
    """``--lora-layers N``: adapters only in the last N layers; out-of-range N is a one-line error."""
    from transformers import AutoModelForCausalLM

    from sgl_adaptive.errors import UserError
    from sgl_adaptive.finetune.train import TrainSettings, _lora, lora_layer_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total = model.config.num_hidden_layers
    assert lora_layer_ids(model, TrainSettings(lora=True)) is None
    peft_model = _lora(model, TrainSettings(lora=True, lora_layers=1))
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert adapted == {str(total - 1)}
    with pytest.raises(UserError, match="--lora-layers must be within"):
        lora_layer_ids(model, TrainSettings(lora=True, lora_layers=total + 1))


def test_mixed_precision_follows_the_hardware(monkeypatch):
    from sgl_adaptive.backends import precision
    from sgl_adaptive.errors import UserError
    from sgl_adaptive.finetune.train import TrainSettings, use_bf16

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert use_bf16(TrainSettings(), use_cuda=False)
    assert not use_bf16(TrainSettings(mixed_precision="no"), use_cuda=False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert not use_bf16(TrainSettings(), use_cuda=False)
    with pytest.raises(UserError, match="--mixed-precision must be auto or no"):
        use_bf16(TrainSettings(mixed_precision="fp8"), use_cuda=False)
