"""End to end on the tiny model: build data with a verifier on a synthetic task, train a few dozen steps,
check that held-out AUROC improves, and that the exported checkpoint loads in transformers and in the
in-process backend, where the self-evaluation program scores with it.

The synthetic task: any prompt; a response is correct when it contains the digit 7 or 9 (the random
tiny model writes one in about half of its 10-token responses, so both labels occur), checked by the
``regex:`` verifier. The score can only learn it from the response it reads."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sgl_adaptive.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def last_json(res):
    return json.loads(res.stdout.strip().splitlines()[-1])


def evaluate(model, data, *extra):
    """``finetune eval --json`` in fp32, the trainer's own precision (its scores must match exactly)."""
    return invoke(
        "finetune", "eval", "--model", model, "--data", data, "--dtype", "float32", "--json", *extra
    )


@pytest.fixture(scope="module")
def synthetic_data(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    prompts = root / "prompts.jsonl"
    rows = [{"id": f"s{i:02d}", "prompt": f"What is {i} + {(7 * i) % 50}?"} for i in range(28)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "data"
    invoke("finetune", "data", "--model", tiny_model_dir, "--prompts", prompts, "--out", out,
           "--reward", "regex:[79]", "-k", "6", "--max-new-tokens", "10", "--truncate", "4",
           "--heldout-fraction", "0.3")  # fmt: skip
    return out


def test_training_improves_heldout_auroc_and_the_checkpoint_serves(tiny_model_dir, synthetic_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    trained = last_json(
        invoke(
            "finetune",
            "train",
            "--model",
            tiny_model_dir,
            "--data",
            synthetic_data,
            "--out",
            ckpt,
            "--lr",
            "5e-3",
            "--max-steps",
            "60",
            "--batch-size",
            "8",
            "--json",
        )  # fmt: skip
    )
    assert trained["steps"] == 60 and trained["before"]["answer_mass"] < trained["after"]["answer_mass"]

    report = last_json(evaluate(ckpt, synthetic_data, "--drift-samples", "16"))
    assert report["base_model"] == str(tiny_model_dir.resolve())
    full, full_before = report["model"]["per_budget"]["full"], report["base"]["per_budget"]["full"]
    assert full["auroc"] >= 0.7 and full["auroc"] >= full_before["auroc"] + 0.2, (full_before, full)
    assert report["auroc"] >= report["auroc_before"] + 0.15, (report["auroc_before"], report["auroc"])
    # calibrated toward the default pairwise target P(win or tie)
    assert report["model"]["brier_soft"] < report["base"]["brier_soft"]
    assert set(report["model"]["per_budget"]) == {"4", "full"}
    assert report["model"]["best_of_n"]["prompts"] >= 5
    assert report["drift"]["tokens"] > 0 and report["drift"]["kl_per_token"] > 0
    assert report["auroc"] == pytest.approx(
        trained["after"]["auroc"], abs=1e-6
    )  # the export is the trained model

    # the checkpoint: transformers, then the in-process backend running the Best-of-N program
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgl_adaptive.backends.local import LocalBackend
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm, score_examples
    from sgl_adaptive.runner import run

    assert AutoModelForCausalLM.from_pretrained(ckpt) is not None
    assert AutoTokenizer.from_pretrained(ckpt).chat_template
    backend = LocalBackend.from_pretrained(str(ckpt), device="cpu", dtype="float32")  # as the scorer
    try:
        result = run("What is 3 + 4?", backend, "best-of-n", n=3, max_new_tokens=8)
    finally:
        backend.shutdown()
    model, tok = load_causal_lm(str(ckpt), device="cpu")
    examples = [{"prompt": "What is 3 + 4?", "text": c.text} for c in result.candidates]
    for cand, mine in zip(
        result.candidates, score_examples(model, SelfEvalEncoder(tok), examples), strict=True
    ):
        assert cand.score == pytest.approx(mine.score, abs=1e-4)


def test_drift_is_zero_against_itself(tiny_model_dir, synthetic_data):
    from sgl_adaptive.data import read_jsonl
    from sgl_adaptive.finetune.evaluate import drift
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm

    model, tok = load_causal_lm(str(tiny_model_dir), device="cpu")
    d = drift(model, model, SelfEvalEncoder(tok), list(read_jsonl(synthetic_data / "heldout.jsonl")), limit=4)
    assert d["responses"] == 4 and d["tokens"] >= 4 * 5
    assert d["kl_per_token"] == pytest.approx(0.0, abs=1e-6) and d["greedy_agreement"] == 1.0


def test_kl_guard_keeps_generations_closer_to_the_base(tiny_model_dir, synthetic_data, tmp_path):
    """Same training with and without the KL guard (frozen base, response tokens): the guard cuts drift."""
    drifts = []
    for weight in ("0", "1"):
        ckpt = tmp_path / f"kl{weight}"
        invoke("finetune", "train", "--model", tiny_model_dir, "--data", synthetic_data, "--out", ckpt,
               "--lr", "5e-3", "--max-steps", "30", "--kl-weight", weight, "--heldout-limit", "1")  # fmt: skip
        res = evaluate(ckpt, synthetic_data, "--drift-samples", "16")
        drifts.append(last_json(res)["drift"])
    free, guarded = drifts
    assert guarded["kl_per_token"] < free["kl_per_token"] / 5, drifts
    assert guarded["greedy_agreement"] > free["greedy_agreement"], drifts


def test_lora_exports_merged_checkpoint_and_adapter(tiny_model_dir, synthetic_data, tmp_path):
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm, score_examples

    ckpt = tmp_path / "lora"
    invoke("finetune", "train", "--model", tiny_model_dir, "--data", synthetic_data, "--out", ckpt, "--lora",
           "--lr", "1e-2", "--max-steps", "6", "--kl-weight", "0.5", "--heldout-limit", "8")  # fmt: skip
    assert (ckpt / "config.json").is_file() and (ckpt / "adapter" / "adapter_config.json").is_file()
    adapter_size = (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_size < (ckpt / "model.safetensors").stat().st_size / 3
    examples = [json.loads(x) for x in (synthetic_data / "heldout.jsonl").read_text().splitlines()[:6]]
    merged, tok = load_causal_lm(str(ckpt), device="cpu")
    adapter, _ = load_causal_lm(str(ckpt / "adapter"), device="cpu")
    base, _ = load_causal_lm(str(tiny_model_dir), device="cpu")
    enc = SelfEvalEncoder(tok)
    s_merged, s_adapter, s_base = (
        [s.score for s in score_examples(m, enc, examples)] for m in (merged, adapter, base)
    )
    assert s_merged == pytest.approx(s_adapter, abs=1e-5)
    assert s_merged != pytest.approx(s_base, abs=1e-3)  # it trained

    # eval accepts the adapter directory too (merged into its base on load)
    res = evaluate(ckpt / "adapter", synthetic_data, "--base", "none", "--drift-samples", "0", "--limit", "6")
    report = last_json(res)
    assert report["model"]["mean_score"] == pytest.approx(sum(s_merged) / 6, abs=1e-5)
    assert "base" not in report and "drift" not in report
