"""Training cannot fail silently: the batch layout that avoids masked attention rows, the kernels used
while training, and a guard at every stage (loss, gradient, export, and every loader of a checkpoint).

Each guard's test fails without it: a diverged run would otherwise exit 0 and export NaN weights (the
first GPU run did), and the loaders would serve or evaluate them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_adaptive.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _example(prompt_id: str, sample: int, text: str, label: str, soft: float, budget: int | None = None):
    return {
        "prompt_id": prompt_id,
        "sample": sample,
        "prompt": f"What is {sample} + 2?",
        "response": text,
        "text": text,
        "truncated_tokens": budget,
        "label": label,
        "soft_no": soft,
        "reward": 1.0 if label == "No" else 0.0,
    }


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A train/held-out set written directly (labels need no sampling for these tests)."""
    root = tmp_path_factory.mktemp("guard-data")
    rows = [
        _example(f"p{i % 4}", i, f"The answer is {i + 2}.", "No", 1.0)
        if i % 2
        else _example(f"p{i % 4}", i, "seven eight nine", "Yes", 0.25)
        for i in range(12)
    ]
    rows.append(_example("p0", 0, "The", "Yes", 0.25, budget=1))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return root


def _train(model, data, out, *extra):
    return runner.invoke(
        app,
        ["finetune", "train", "--model", str(model), "--data", str(data), "--out", str(out),
         "--batch-size", "4", "--heldout-limit", "0", *map(str, extra)],
    )  # fmt: skip


def _error_lines(output: str) -> list[str]:
    """The ``error:`` lines (a progress bar may share the terminal line, up to a carriage return)."""
    lines = output.replace("\r", "\n").splitlines()
    return [line[line.index("error:") :] for line in lines if "error:" in line]


# ---- the batch layout -------------------------------------------------------------------------------


def test_right_padded_batches_have_no_fully_masked_query_rows(tiny_model_dir):
    """The old layout (left padding + mask) gives every pad position a query row with nothing to attend
    to (-inf log-sum-exp: the cuDNN backward's NaN trigger); the training layout has none, and sends
    no mask at all."""
    import torch
    from transformers import AutoTokenizer

    from sgl_adaptive.finetune.batching import fully_masked_query_rows
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, left_pad
    from sgl_adaptive.finetune.train import OneTokenCollator, encode_examples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [
        _example("a", 0, "one", "No", 1.0),
        _example("b", 1, "one two three four five six", "Yes", 0.0),
    ]
    features, _ = encode_examples(examples, SelfEvalEncoder(tok), 2048, with_response=False)
    rows = [f["input_ids"] for f in features]
    pads = abs(len(rows[0]) - len(rows[1]))
    _, mask, _ = left_pad(rows, 0)
    assert fully_masked_query_rows(mask, mask.shape[1]) == pads > 0
    batch = OneTokenCollator(0)(features)
    assert "attention_mask" not in batch
    assert fully_masked_query_rows(batch.get("attention_mask"), batch["input_ids"].shape[1]) == 0
    assert fully_masked_query_rows(torch.ones_like(mask), mask.shape[1]) == 0


def test_training_runs_with_cudnn_attention_off_and_restores_it(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    import torch

    from sgl_adaptive.finetune import train as train_module

    seen = []
    original = train_module.one_token_loss

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "one_token_loss", spy)
    torch.backends.cuda.enable_cudnn_sdp(True)
    res = _train(tiny_model_dir, tiny_data, tmp_path / "out", "--max-steps", "2", "--lr", "1e-4")
    assert res.exit_code == 0, res.output
    assert seen and not any(seen)  # off during every training step
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored afterwards


# ---- the guards ---------------------------------------------------------------------------------------


def test_absurd_learning_rate_stops_with_one_line_error_and_no_weights(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "diverged"
    res = _train(tiny_model_dir, tiny_data, out, "--lr", "1e30", "--max-steps", "8")
    assert res.exit_code != 0
    errors = _error_lines(res.output)
    assert len(errors) == 1 and "training stopped at step" in errors[0], res.output
    assert "non-finite loss" in errors[0]  # the loss guard fires before the gradient one
    assert "Traceback" not in res.output
    assert not out.exists()  # nothing exported, not even an empty folder


def test_lora_absurd_learning_rate_leaves_an_existing_folder_without_weights(
    tiny_model_dir, tiny_data, tmp_path
):
    out = tmp_path / "existing"
    out.mkdir()
    res = _train(tiny_model_dir, tiny_data, out, "--lora", "--lr", "1e30", "--max-steps", "8")
    assert res.exit_code != 0 and len(_error_lines(res.output)) == 1, res.output
    assert out.is_dir() and not list(out.rglob("*.safetensors"))


def test_non_finite_gradient_stops_before_the_optimizer_step(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    """A finite loss with a NaN gradient (the GPU run's signature) stops at step 1, naming the gradient."""
    import torch

    from sgl_adaptive.finetune import train as train_module

    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    original = train_module.one_token_loss

    def poisoned(*args, **kwargs):
        loss, logp = original(*args, **kwargs)
        return NanGradient.apply(loss), logp

    monkeypatch.setattr(train_module, "one_token_loss", poisoned)
    out = tmp_path / "nan-grad"
    res = _train(tiny_model_dir, tiny_data, out, "--lr", "1e-4", "--max-steps", "3")
    errors = _error_lines(res.output)
    assert res.exit_code != 0 and len(errors) == 1, res.output
    assert "step 1" in errors[0] and "non-finite gradient" in errors[0]
    assert not out.exists()


def test_non_finite_gradient_names_the_tensors(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from sgl_adaptive.finetune.train import non_finite_gradients

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    params = dict(model.named_parameters())
    name = next(iter(params))
    for p in params.values():
        p.grad = torch.zeros_like(p)
    assert non_finite_gradients(model) == []
    params[name].grad[0] = math.inf
    assert non_finite_gradients(model) == [name]


def test_export_refuses_non_finite_weights_and_writes_nothing(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgl_adaptive.finetune.train import TrainSettings, export
    from sgl_adaptive.weights import NonFiniteWeightsError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.nan
    out = tmp_path / "export"
    with pytest.raises(NonFiniteWeightsError, match="non-finite"):
        export(model, AutoTokenizer.from_pretrained(tiny_model_dir), out, TrainSettings(), torch.float32, {})
    assert not out.exists()


def test_export_refuses_weights_that_overflow_the_export_dtype(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgl_adaptive.finetune.train import TrainSettings, export
    from sgl_adaptive.weights import NonFiniteWeightsError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        next(model.parameters())[0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(NonFiniteWeightsError, match="float16"):
        export(
            model,
            AutoTokenizer.from_pretrained(tiny_model_dir),
            tmp_path / "o",
            TrainSettings(),
            torch.float16,
            {},
        )
    assert not list((tmp_path / "o").rglob("*.safetensors")) if (tmp_path / "o").exists() else True


@pytest.fixture(scope="module")
def broken_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with one NaN weight, saved as a checkpoint (what the diverged GPU run exported)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("broken") / "ckpt"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[3, 3] = math.nan
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def broken_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter whose tensors are all NaN (the exported adapter of the GPU run)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("broken-adapter") / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_(math.nan)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("which", ["checkpoint", "adapter"])
def test_eval_refuses_non_finite_weights(which, broken_checkpoint, broken_adapter, tiny_data):
    model = broken_checkpoint if which == "checkpoint" else broken_adapter
    res = runner.invoke(
        app, ["finetune", "eval", "--model", str(model), "--data", str(tiny_data), "--base", "none", "--json"]
    )
    errors = _error_lines(res.output)
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert "non-finite (NaN/inf) weights" in errors[0]
    assert '"auroc"' not in res.stdout


def test_run_refuses_non_finite_weights(broken_checkpoint):
    res = runner.invoke(
        app, ["run", "What is 1 + 1?", "--model", str(broken_checkpoint), "--n", "2", "--json"]
    )
    errors = _error_lines(res.output)
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert "non-finite (NaN/inf) weights" in errors[0]


def test_serve_refuses_non_finite_weights(broken_checkpoint, monkeypatch):
    from sgl_adaptive.backends import http_server

    def reached(*args, **kwargs):
        raise OSError("the server started on a broken model")  # instead of serving forever

    monkeypatch.setattr(http_server, "serve", reached)
    res = runner.invoke(app, ["serve", "--model", str(broken_checkpoint), "--port", "0"])
    errors = _error_lines(res.output)
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert "non-finite (NaN/inf) weights" in errors[0]


def test_merging_a_non_finite_adapter_is_refused(tiny_model_dir, broken_adapter, tmp_path):
    from sgl_adaptive.model_store import merge_adapter
    from sgl_adaptive.weights import NonFiniteWeightsError

    with pytest.raises(NonFiniteWeightsError):
        merge_adapter(tiny_model_dir, broken_adapter, tmp_path / "merged")
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("scorer", ["score_examples", "score_packed"])
def test_scores_of_a_broken_model_are_an_error_not_one_half(tiny_model_dir, scorer):
    """A model whose forward gives NaN (weights checked elsewhere) must not score 0.5 silently, with
    either scorer (``eval`` and ``train`` use the packed one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgl_adaptive.errors import ProgramError
    from sgl_adaptive.finetune import packing, scoring
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder

    score = getattr(packing if scorer == "score_packed" else scoring, scorer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(math.nan)
    enc = SelfEvalEncoder(AutoTokenizer.from_pretrained(tiny_model_dir))
    with pytest.raises(ProgramError, match="non-finite"):
        score(model, enc, [{"prompt": "Hi", "text": "one two"}])


# ---- CPU-run options ----------------------------------------------------------------------------------


def test_budgets_and_max_examples_select_a_seeded_subset(tiny_data):
    from sgl_adaptive.data import read_jsonl
    from sgl_adaptive.errors import UserError
    from sgl_adaptive.finetune.train import TrainSettings, parse_train_budgets, select_examples

    rows = list(read_jsonl(tiny_data / "train.jsonl"))
    assert parse_train_budgets("full, 1,full") == ("full", "1") and parse_train_budgets("all") is None
    with pytest.raises(UserError, match="--budgets"):
        parse_train_budgets("full,-3")
    full_only = select_examples(rows, TrainSettings(budgets=("full",)))
    assert len(full_only) == 12 and all(r["truncated_tokens"] is None for r in full_only)
    assert [r["truncated_tokens"] for r in select_examples(rows, TrainSettings(budgets=("1",)))] == [1]
    a = select_examples(rows, TrainSettings(max_examples=5, seed=3))
    assert len(a) == 5 and a == select_examples(rows, TrainSettings(max_examples=5, seed=3))
    assert a != select_examples(rows, TrainSettings(max_examples=5, seed=4))


def test_pairwise_soft_labels_are_the_default(tiny_model_dir, tiny_data, tmp_path):
    res = _train(tiny_model_dir, tiny_data, tmp_path / "o", "--max-steps", "1", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["labels"].startswith("pairwise")
    info = json.loads((tmp_path / "o" / "sgl-adaptive-finetune.json").read_text())
    assert info["settings"]["soft_labels"] is True

    from sgl_adaptive.finetune.train import TrainSettings

    assert TrainSettings().soft_labels  # the Python API's default too


# ---- the device check ---------------------------------------------------------------------------------


def test_attention_check_runs_every_variant_on_a_width_of_64_mod_128(tiny_model_dir, tmp_path):
    """The one-command GPU check, on CPU: one batch 64 mod 128 wide, old and new layout × cuDNN on/off.
    On a CPU every gradient is finite (the kernel in question is CUDA's); the left layout has pad rows."""
    from sgl_adaptive.finetune import attention_check

    rows = [_example(f"p{i}", i, " ".join(["seven"] * i), "No", 1.0) for i in range(1, 160)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "check.json"
    assert attention_check.main(["--model", str(tiny_model_dir), "--data", str(tmp_path), "--rows", "4",
                                 "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    variants = {(v["layout"], v["cudnn_sdp"]): v for v in report["model"]}
    assert set(variants) == {("left", True), ("left", False), ("right", True), ("right", False)}
    for v in variants.values():
        assert v["width"] % 128 == 64 and v["non_finite_gradients"] == 0 and math.isfinite(v["loss"])
    assert (
        variants["left", True]["fully_masked_query_rows"]
        > 0
        == variants["right", True]["fully_masked_query_rows"]
    )
    assert variants["left", True]["loss"] == pytest.approx(variants["right", True]["loss"], rel=1e-4)


def test_pick_rows_takes_a_longest_row_of_64_mod_128():
    from sgl_adaptive.finetune.attention_check import pick_rows

    lengths = [10, 192, 50, 320, 100, 64, 300]
    chosen = pick_rows(lengths, 3)
    assert lengths[chosen[0]] == 320 and len(chosen) == 3 and all(lengths[i] < 320 for i in chosen[1:])
    assert pick_rows([10, 20], 2) == []


def test_train_json_stdout_is_one_object(tiny_model_dir, tiny_data, tmp_path):
    """The Trainer's loss lines and progress go to stderr: ``--json`` prints exactly one JSON object."""
    res = runner.invoke(
        app,
        ["finetune", "train", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--out",
         str(tmp_path / "o"), "--max-steps", "2", "--logging-steps", "1", "--heldout-limit", "0", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 2
    assert "'loss'" in res.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_finite_check_reads_every_chunk_and_survives_overflowing_sums(dtype, monkeypatch):
    import torch

    from sgl_adaptive import weights

    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 8)
    t = torch.zeros(5, 7, dtype=getattr(torch, dtype))  # 35 elements: 5 chunks, the last one short
    assert weights.is_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u.view(-1)[-1] = bad  # in the short last chunk
        assert not weights.is_finite(u)
    cancel = t.clone()
    cancel.view(-1)[:2] = torch.tensor([float("inf"), float("-inf")])  # sums to NaN, not to a finite value
    assert not weights.is_finite(cancel)
    huge = torch.full((5, 7), 3e38, dtype=getattr(torch, dtype))  # finite, but every chunk's sum overflows
    assert weights.is_finite(huge)
    assert weights.non_finite_tensors([("ok", t), ("ids", torch.ones(3, dtype=torch.long)), ("bad", u)]) == [
        "bad"
    ]
