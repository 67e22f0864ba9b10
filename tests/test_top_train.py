"""Training the top blocks from the activation cache: exact, guarded, and what it exports is what it scored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.test_packing import _examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    """The tiny model with 4 layers, so that k = 1 and k = 2 both leave frozen blocks below."""
    from sgl_adaptive.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny4") / "model", layers=4)


@pytest.fixture(scope="module")
def cache_dir(four_layer_model, tmp_path_factory):
    import torch
    from transformers import AutoTokenizer

    from sgl_adaptive.finetune.activation_cache import build_cache

    root = tmp_path_factory.mktemp("cache")
    data = root / "data"
    data.mkdir()
    examples = _examples(AutoTokenizer.from_pretrained(four_layer_model))
    (data / "train.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    build_cache(str(four_layer_model), data, root / "cache", k=2, dtype=torch.float32, device="cpu")
    return root / "cache"


def _stack(model_dir, cache_dir, **settings):
    import torch

    from sgl_adaptive.finetune.activation_cache import ActivationCache
    from sgl_adaptive.finetune.top_train import TopSettings, TopStack, load_base

    base, encoder = load_base(str(model_dir), dtype=torch.float32)
    return TopStack(base, ActivationCache(cache_dir), TopSettings(**settings), encoder)


@pytest.mark.parametrize("k", [1, 2])
def test_untrained_stack_scores_equal_the_whole_model(four_layer_model, cache_dir, k):
    import torch

    from sgl_adaptive.finetune.packing import score_packed
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm

    stack = _stack(four_layer_model, cache_dir, k=k)
    model, tokenizer = load_causal_lm(str(four_layer_model), device="cpu", dtype=torch.float32)
    examples = stack.cache.examples
    reference = score_packed(model, SelfEvalEncoder(tokenizer), examples)
    for n in stack.cache.complete():
        for i, score in zip(stack.cache.groups[n], stack.scores(n), strict=True):
            assert score.score == pytest.approx(reference[i].score, abs=1e-5)
            assert score.p_no == pytest.approx(reference[i].p_no, abs=1e-5)


def test_top_block_at_some_nodes_equals_the_full_block(four_layer_model, cache_dir):
    import torch

    stack = _stack(four_layer_model, cache_dir, k=1)
    hidden, shard, tree = stack.entering(0)
    body = stack.base.model
    pos = torch.tensor([tree.positions])
    rotary = body.rotary_emb(hidden[None], pos)
    mask = torch.from_numpy(tree.ancestor_mask())[None, None]
    with torch.no_grad():
        full = body.layers[-1](
            hidden[None], attention_mask=mask, position_ids=pos, position_embeddings=rotary
        )[0]
        query = [0, 5, tree.size - 1, *tree.ends[:3]]
        part = stack.top_block(body.layers[-1], hidden, tree, rotary, query)
    assert torch.allclose(part, full[query], atol=1e-5)


def test_training_moves_the_scores_and_the_export_scores_the_same(four_layer_model, cache_dir, tmp_path):
    import torch

    from sgl_adaptive.finetune.packing import score_packed
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm
    from sgl_adaptive.finetune.top_train import export_adapter, train_stack
    from sgl_adaptive.model_store import merge_adapter

    stack = _stack(four_layer_model, cache_dir, k=2, lr=5e-3, epochs=20, prompts_per_step=1, kl_weight=0.1)
    before = [s.score for n in (0, 1) for s in stack.scores(n)]
    lines = []
    run = train_stack(stack, [0, 1], log=lines.append)
    after = [s.score for n in (0, 1) for s in stack.scores(n)]
    assert run["steps"] == 40 and lines and "kl" in lines[-1]
    assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 0.05
    # the loss fell: the scores moved towards the labels
    labels = [stack.cache.examples[i]["soft_no"] for n in (0, 1) for i in stack.cache.groups[n]]
    err = lambda scores: sum((s - y) ** 2 for s, y in zip(scores, labels, strict=True))  # noqa: E731
    assert err(after) < err(before)

    adapter = export_adapter(stack, tmp_path / "adapter", {"note": "test"})
    assert (adapter / "adapter_config.json").is_file() and (adapter / "training.json").is_file()
    merged = merge_adapter(four_layer_model, adapter, tmp_path / "merged")
    model, tokenizer = load_causal_lm(str(merged), device="cpu", dtype=torch.float32)
    examples = [stack.cache.examples[i] for n in (0, 1) for i in stack.cache.groups[n]]
    exported = [s.score for s in score_packed(model, SelfEvalEncoder(tokenizer), examples)]
    assert exported == pytest.approx(after, abs=1e-4)
    # only the trained blocks and the two head rows changed
    base, _ = load_causal_lm(str(four_layer_model), device="cpu", dtype=torch.float32)
    changed = {
        name
        for (name, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items(), strict=True)
        if not torch.equal(a, b)
    }
    assert changed and all(".layers.2." in n or ".layers.3." in n or n == "lm_head.weight" for n in changed)
    rows = (base.lm_head.weight != model.lm_head.weight).any(-1).nonzero().flatten().tolist()
    assert sorted(rows) == sorted([stack.no_id, stack.yes_id])


def test_a_non_finite_loss_stops_training(four_layer_model, cache_dir, monkeypatch):
    from sgl_adaptive.finetune.top_train import TopStack, train_stack
    from sgl_adaptive.finetune.train import TrainingDivergedError

    stack = _stack(four_layer_model, cache_dir, k=1, epochs=1, prompts_per_step=1)
    real = TopStack.loss

    def poisoned(self, n, rng):
        loss, parts = real(self, n, rng)
        return loss * math.nan, parts

    monkeypatch.setattr(TopStack, "loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="step 1: non-finite loss"):
        train_stack(stack, [0, 1], log=lambda _: None)


def test_k_larger_than_the_cache_is_refused(four_layer_model, cache_dir):
    from sgl_adaptive.errors import UserError

    with pytest.raises(UserError, match="--k must be within"):
        _stack(four_layer_model, cache_dir, k=3)


def _cli(*args):
    from typer.testing import CliRunner

    from sgl_adaptive.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_cross_validates_probes_exports_and_writes_the_card(
    four_layer_model, cache_dir, tmp_path, monkeypatch
):
    out = tmp_path / "cv"
    res = _cli(
        "finetune",
        "top",
        "--cache",
        cache_dir,
        "--model",
        four_layer_model,
        "--out",
        out,
        "--name",
        "k1",
        "--cv",
        2,
        "--epochs",
        1,
        "--prompts-per-step",
        1,
        "--dtype",
        "float32",
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "k1.json").read_text())
    assert report["report"]["summary"]["n"] == 55 and len(report["folds"]) == 2
    assert "against_untrained" in report and (out / "k1.untrained.json").is_file()
    assert len((out / "k1.scores.jsonl").read_text().splitlines()) == 55
    assert "AUROC" in (out / "k1.md").read_text()

    res = _cli("finetune", "probe", "--cache", cache_dir, "--out", out, "--folds", 2, "--layers", "0,2")
    assert res.exit_code == 0, res.output
    curve = json.loads((out / "probe-curve.json").read_text())
    assert [row["layer"] for row in curve["layers"]] == [0, 2]
    res = _cli("finetune", "probe", "--cache", cache_dir, "--out", out, "--folds", 2, "--budgets", "full")
    assert res.exit_code == 0, res.output
    full = json.loads((out / "probe-curve-full.json").read_text())
    assert full["examples"] == 6 and full["budgets"] == ["full"] and len(full["layers"]) == 3
    res = _cli("finetune", "probe", "--cache", cache_dir, "--out", out, "--layers", "9")
    assert res.exit_code == 2 and "--layers must be within [0, 2]" in res.output

    adapter = tmp_path / "adapter"

    def export(*extra):
        top = ["finetune", "top", "--cache", cache_dir, "--model", four_layer_model, "--out", adapter]
        return _cli(*top, "--cv", 0, "--epochs", 1, "--dtype", "float32", *extra)

    res = export()
    assert res.exit_code == 0, res.output
    assert (adapter / "adapter_model.safetensors").is_file()
    card = json.loads((adapter / "training.json").read_text())
    assert card["prompts"] == 2 and card["settings"]["k"] == 1

    monkeypatch.setenv("SGLADAPTIVE_CACHE", str(tmp_path / "store"))  # merges go there
    # the card refuses a report of other settings (this export used 4 prompts per step, the report 1)
    card_args = ["finetune", "card", "--adapter", adapter, "--model", four_layer_model, "--dtype", "float32"]
    res = _cli(*card_args, "--report", out / "k1.json")
    assert res.exit_code == 2 and "cross-validated other settings" in res.output
    res = export("--prompts-per-step", 1)
    assert res.exit_code == 0, res.output
    times = tmp_path / "times.tsv"
    times.write_text("cache\t60.5\t1024\nfinal\t30\t2048\nmerge\t6\t\n")
    res = _cli(*card_args, "--report", out / "k1.json", "--times", times, "--command", "finetune top --cv 0")
    assert res.exit_code == 0, res.output
    assert "default model: no (out-of-fold Best-of-3 minus first sample" in res.output
    readme = (adapter / "README.md").read_text()
    assert (
        "| final | 0.5 min | 2.0 GiB |" in readme
        and "| merge | 0.1 min | — |" in readme
        and "    finetune top --cv 0" in readme
    )
    assert (
        "Best-of-" in readme
        and json.loads((adapter / "card.json").read_text())["decision"]["default"] is False
    )
    merged = _cli("finetune", "merge", "--adapter", adapter, "--model", four_layer_model)
    assert merged.exit_code == 0, merged.output
    assert (Path(merged.stdout.strip().splitlines()[-1]) / "config.json").is_file()


def test_cli_refuses_a_cache_of_another_model(tiny_model_dir, cache_dir, tmp_path):
    res = _cli(
        "finetune",
        "top",
        "--cache",
        cache_dir,
        "--model",
        tiny_model_dir,
        "--out",
        tmp_path / "x",
        "--cv",
        0,
        "--dtype",
        "float32",
    )
    assert res.exit_code == 2 and "cached from another model" in res.output
