"""Model dtype choice, and exact answer-token logprobs from a bf16 model."""

from __future__ import annotations

import pytest
import torch
from sglang.lang.ir import SglSamplingParams

from sgl_adaptive.backends import precision
from sgl_adaptive.backends.precision import ExactHead, default_dtype, parse_dtype

PROMPT = (
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nWell?"
)


def test_default_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert default_dtype("cpu") is torch.float32
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert default_dtype("cpu") is torch.bfloat16
    assert default_dtype("cuda") is torch.bfloat16


def test_parse_dtype():
    assert parse_dtype(None) is None and parse_dtype("auto") is None
    assert parse_dtype("float32") is torch.float32 and parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")


@pytest.fixture()
def bf16_backend(tiny_model_dir):
    """A bf16 backend whose answer-token logits are large (|logit| ~ 24), where bf16 rounds in steps of 0.125."""
    from sgl_adaptive.backends.local import LocalBackend

    backend = LocalBackend.from_pretrained(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    ids = sorted(backend.answer_ids)
    head = backend.model.get_output_embeddings()
    prompt_ids = torch.tensor([backend.tokenizer.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        logits = backend.model(input_ids=prompt_ids).logits[0, -1, ids].float()
        head.weight[ids] *= (24.0 / logits.abs().max()).to(head.weight.dtype)
    yield backend
    backend.shutdown()


def reference(model, text_ids: list[int], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 answer logprobs from the head's input, the same from the bf16 logits) for one forward."""
    captured = {}
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, inputs, out: captured.update(h=inputs[0]))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([text_ids]), logits_to_keep=1).logits[0, -1].float()
    finally:
        hook.remove()
    norm = torch.logsumexp(logits, -1)
    exact = (captured["h"][0, -1].float() @ head.weight[ids].float().T - norm).detach()
    return exact, logits[ids] - norm


def test_answer_logprobs_are_fp32_exact_in_a_bf16_model(bf16_backend):
    assert bf16_backend.engine.exact_head.enabled
    ids = sorted(bf16_backend.answer_ids)
    sp = SglSamplingParams(max_new_tokens=1, temperature=0.0)
    sp.return_logprob = True
    _, meta = bf16_backend.complete(PROMPT, sp, token_ids_logprob=ids)
    got = torch.tensor([lp for lp, _, _ in meta["output_token_ids_logprobs"][0]])
    exact, rounded = reference(bf16_backend.model, bf16_backend.memo.encode(PROMPT), ids)
    assert got == pytest.approx(exact.tolist(), abs=1e-4)
    assert (rounded - exact).abs().max() > 1e-3  # the bf16 logits alone would be off


@pytest.mark.parametrize("scorer", ["score_examples", "score_packed"])
def test_finetune_scores_use_the_exact_head(bf16_backend, scorer):
    from sgl_adaptive.finetune import packing, scoring
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder

    score_fn = getattr(packing if scorer == "score_packed" else scoring, scorer)
    model, tokenizer = bf16_backend.model, bf16_backend.tokenizer
    encoder = SelfEvalEncoder(tokenizer)
    example = {"prompt": "What is 2 + 3?", "text": "4"}
    hooks = dict(model.get_output_embeddings()._forward_hooks)  # the engine's own
    (score,) = score_fn(model, encoder, [example])
    exact, _ = reference(model, encoder.prompt_ids(example["prompt"], example["text"]), encoder.keep_ids)
    assert score.p_no == pytest.approx(float(exact.exp().sum()), rel=1e-4)
    assert dict(model.get_output_embeddings()._forward_hooks) == hooks  # the scorer removed its hook


def test_exact_head_is_off_for_fp32_models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with ExactHead(model) as exact:
        assert not exact.enabled and exact.last_hidden() is None


def test_drift_of_a_bf16_model_uses_fp32_logits(bf16_backend):
    """Drift compares next-token distributions in fp32 even for bf16 models: a model against itself
    drifts by exactly 0, and its log-probabilities are the fp32 head's, not the bf16-rounded ones."""
    from sgl_adaptive.finetune.evaluate import _response_logprobs, drift
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, left_pad

    model, encoder = bf16_backend.model, SelfEvalEncoder(bf16_backend.tokenizer)
    example = {"prompt": "What is 2 + 3?", "response": "It is 5.", "text": "It is 5.", "prompt_id": "p"}
    example |= {"sample": 0, "truncated_tokens": None}
    ids, start, end = encoder.prompt_ids_and_response(example["prompt"], example["response"])
    got = _response_logprobs(model, *left_pad([ids[:end]], 0), keep=end - start + 1)
    head = model.get_output_embeddings()
    captured = {}
    hook = head.register_forward_hook(lambda m, inputs, out: captured.update(h=inputs[0]))
    try:
        with torch.no_grad():
            rounded = model(input_ids=torch.tensor([ids[:end]]), logits_to_keep=end - start + 1).logits
    finally:
        hook.remove()
    exact = torch.log_softmax(captured["h"][0, :-1].float() @ head.weight.detach().float().T, -1)
    assert got == pytest.approx(exact, abs=1e-4)
    assert (torch.log_softmax(rounded[0, :-1].float(), -1) - exact).abs().max() > 1e-3
    report = drift(model, model, encoder, [example])
    assert report["tokens"] == end - start and report["kl_per_token"] == pytest.approx(0.0, abs=1e-9)
