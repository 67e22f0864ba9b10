"""The ``rm`` and ``judge`` scorers: scores against independent computations (the reward model run by hand,
P(Yes) read from the backend for the judge's own question), their costs, both backends, the one-line
errors of ``run``, ``batch`` and ``serve``, and the one reward-model class that finetune and bench share."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from sglang.lang.ir import SglSamplingParams
from typer.testing import CliRunner

from sgl_adaptive import MethodConfig, run
from sgl_adaptive.chat_template import render_selfeval_prompt
from sgl_adaptive.cli import app
from sgl_adaptive.errors import UserError
from sgl_adaptive.scorers import DEFAULT_JUDGE_PROMPT, SCORERS, judge_config
from sgl_adaptive.selfeval import answer_token_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "What is 2 + 3?"
SMALL = dict(max_new_tokens=8, temperature=1.0)
JUDGE = 'Is this reply right? ("Yes." or "No.")'


# ---- independent computations ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def rm_by_hand(reward_model_dir: Path):
    """The reward model run by hand, one unpadded row per response: (score, tokens read)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32).eval()

    def score(prompt: str, response: str) -> tuple[float, int]:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            return float(model(input_ids=ids).logits[0, 0]), int(ids.shape[1])

    score.model = model  # type: ignore[attr-defined]
    return score


def rm_read_flops(model, tokens: int) -> float:
    """The documented cost of one read: 2 x body parameters x tokens + attention 4 x layers x width x
    attended keys + the one-logit score head."""
    cfg = model.config
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    width = cfg.num_attention_heads * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    )
    keys = tokens * (tokens + 1) // 2
    return 2 * body * tokens + 4 * cfg.num_hidden_layers * width * keys + 2 * cfg.hidden_size * 1


def p_yes(backend, text: str) -> float:
    """P(Yes) / (P(Yes) + P(No)) of the next token after ``text``, from the backend's exact answer logprobs."""
    ids = answer_token_ids(backend.tokenizer, judge_config())
    params = SglSamplingParams(max_new_tokens=1, temperature=0.0, return_logprob=True)
    _, meta = backend.complete(text, params, token_ids_logprob=sorted(ids))
    mass = {"yes": 0.0, "no": 0.0}
    for logprob, token_id, _ in meta["output_token_ids_logprobs"][0]:
        mass[ids[token_id]] += math.exp(logprob)
    return mass["yes"] / (mass["yes"] + mass["no"])


@pytest.fixture()
def eval_texts(backend, monkeypatch) -> list[str]:
    """The text of every one-token request (the evaluations) the programs send to the in-process backend."""
    seen: list[str] = []
    complete = backend.complete

    def spy(text, sp, token_ids_logprob=None):
        if sp.max_new_tokens == 1:
            seen.append(text)
        return complete(text, sp, token_ids_logprob)

    monkeypatch.setattr(backend, "complete", spy)
    return seen


# ---- rm ------------------------------------------------------------------------------------------------
def test_best_of_n_by_rm_picks_the_argmax_of_the_reward_models_own_scores(
    backend, reward_model_dir, rm_by_hand
):
    backend.flush_cache()  # both runs start cold, so that their policy requests cost the same
    r = run(
        PROMPT, backend, "best-of-n", n=4, scorer="rm", reward_model=str(reward_model_dir), seed=3, **SMALL
    )
    by_hand = [rm_by_hand(PROMPT, c.text) for c in r.candidates]
    expected = [s for s, _ in by_hand]
    assert [c.score for c in r.candidates] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert r.best == max(range(4), key=lambda i: (expected[i], -i))
    assert all(c.scores == [(c.tokens, c.score)] for c in r.candidates)
    # costs: no evaluation request; the reward model's reads counted apart and added to the FLOPs
    c = r.costs
    assert (c.self_evals, c.eval_prefill_tokens, c.rm_reads) == (0, 0, 4)
    assert c.rm_tokens == sum(t for _, t in by_hand)
    assert c.rm_flops == pytest.approx(sum(rm_read_flops(rm_by_hand.model, t) for _, t in by_hand), rel=1e-6)
    backend.flush_cache()
    unscored = run(PROMPT, backend, "best-of-n", n=4, selector="majority", seed=3, **SMALL)
    assert sorted(x.text for x in unscored.candidates) == sorted(x.text for x in r.candidates)
    assert c.flops == pytest.approx(unscored.costs.flops + c.rm_flops)
    out = r.to_dict()
    assert (out["rm_reads"], out["rm_tokens"], out["rm_flops"]) == (4, c.rm_tokens, c.rm_flops)
    assert out["config"]["reward_model"] == str(reward_model_dir)
    assert "reward model 4 reads" in r.summary()


def test_pruning_by_rm_scores_the_partial_responses(endless_backend, reward_model_dir, rm_by_hand):
    r = run(
        PROMPT, endless_backend, "prune", n=4, keep=2, prune_at=4, scorer="rm",
        reward_model=str(reward_model_dir), **SMALL,
    )  # fmt: skip
    first = [c.scores[0] for c in r.candidates]
    assert all(tokens == 4 for tokens, _ in first)
    pruned = [c for c in r.candidates if c.pruned]
    assert len(pruned) == 2
    for c in pruned:  # a pruned sample's text is its 4-token prefix: the text the reward model read
        assert c.scores[0][1] == pytest.approx(rm_by_hand(PROMPT, c.text)[0], rel=1e-4, abs=1e-5)
    kept = sorted(range(4), key=lambda i: (-first[i][1], i))[:2]
    assert sorted(i for i, c in enumerate(r.candidates) if not c.pruned) == sorted(kept)
    assert all(len(r.candidates[i].scores) == 2 for i in kept)
    assert r.costs.rm_reads == 4 + 2 and r.costs.self_evals == 0


def test_adaptive_by_rm_with_an_answer_stop(backend, reward_model_dir):
    r = run(
        PROMPT, backend, "adaptive", n=4, scorer="rm", reward_model=str(reward_model_dir), stop="esc", **SMALL
    )
    assert r.costs.rm_reads == len(r.candidates) and all(c.score is not None for c in r.candidates)


# ---- judge ---------------------------------------------------------------------------------------------
def test_judge_scores_are_p_yes_of_the_judges_question(backend, eval_texts):
    r = run(PROMPT, backend, "best-of-n", n=3, scorer="judge", judge_prompt=JUDGE, seed=5, **SMALL)
    template = backend.chat_template
    expected_texts = [render_selfeval_prompt(template, PROMPT, c.text, JUDGE) for c in r.candidates]
    assert sorted(eval_texts) == sorted(expected_texts)
    expected = [p_yes(backend, t) for t in expected_texts]
    assert [c.score for c in r.candidates] == pytest.approx(expected, abs=1e-6)
    assert r.best == max(range(3), key=lambda i: (expected[i], -i))
    # counted as evaluations, like the self-evaluation
    assert r.costs.self_evals == 3 and r.costs.eval_prefill_tokens > 0 and r.costs.rm_reads == 0
    assert r.to_dict()["config"]["judge_prompt"] == JUDGE


def test_the_judge_may_drive_the_threshold_stop(backend):
    MethodConfig(scorer="judge").check_for("adaptive")
    r = run(PROMPT, backend, "adaptive", n=4, scorer="judge", threshold=0.0, **SMALL)
    assert r.costs.batches == 1 and r.costs.self_evals == 1  # P(Yes) >= 0 stops after the first round


# ---- the endpoint backend ---------------------------------------------------------------------------
def best_of_two_at_temperature_0(backend, **knobs):
    """Best-of-2 at temperature 0: the same text twice, the same on every backend. The program itself runs:
    ``run`` answers temperature 0 with one greedy sample."""
    from sgl_adaptive.programs import PROGRAMS
    from sgl_adaptive.runner import run_program

    config = MethodConfig(n=2, max_new_tokens=8, temperature=0.0, **knobs)
    return run_program(PROGRAMS["best-of-n"], PROMPT, backend, config, name="best-of-n")


def test_rm_and_judge_through_an_sglang_server(backend, reward_model_dir):
    from sgl_adaptive.backends.endpoint import SGLangEndpoint
    from sgl_adaptive.backends.http_server import serve

    server = serve(backend, port=0)
    try:
        endpoint = SGLangEndpoint(f"http://127.0.0.1:{server.server_address[1]}")
        server.requests.clear()
        rm = dict(scorer="rm", reward_model=str(reward_model_dir))
        via_http = best_of_two_at_temperature_0(endpoint, **rm)
        judged = best_of_two_at_temperature_0(endpoint, scorer="judge", judge_prompt=JUDGE)
        bodies = [b for b in server.requests if b.get("return_logprob")]
    finally:
        server.shutdown()
    local = best_of_two_at_temperature_0(backend, **rm)
    assert [c.text for c in via_http.candidates] == [c.text for c in local.candidates]
    assert [c.score for c in via_http.candidates] == pytest.approx([c.score for c in local.candidates])
    assert via_http.costs.rm_reads == 2 and via_http.costs.self_evals == 0
    assert via_http.costs.flops > via_http.costs.rm_flops > 0
    assert judged.costs.self_evals == 2 and len(bodies) == 2 and all(JUDGE in b["text"] for b in bodies)
    local_judged = best_of_two_at_temperature_0(backend, scorer="judge", judge_prompt=JUDGE)
    assert [c.score for c in judged.candidates] == pytest.approx(
        [c.score for c in local_judged.candidates], abs=1e-6
    )


# ---- configuration, command line and serve ------------------------------------------------------------
def test_the_config_rules_of_rm_and_judge():
    assert SCORERS == ("self-eval", "confidence", "self-certainty", "rm", "judge")
    with pytest.raises(UserError, match="--scorer rm needs --reward-model DIR"):
        MethodConfig(scorer="rm")
    with pytest.raises(
        UserError, match=r"--reward-model is read only by --scorer rm \(this run has --scorer judge"
    ):
        MethodConfig(scorer="judge", reward_model="x")
    with pytest.raises(
        UserError, match="--stop threshold needs a calibrated score.*--scorer self-eval or judge"
    ):
        MethodConfig(scorer="rm", reward_model="x").check_for("adaptive-prune")
    with pytest.raises(UserError, match="--judge-prompt is empty"):
        MethodConfig(scorer="judge", judge_prompt=" ")
    MethodConfig(scorer="rm", reward_model="x", stop="beta").check_for("adaptive")
    assert MethodConfig(scorer="judge", judge_prompt=JUDGE).evaluation() == judge_config(JUDGE)
    assert MethodConfig(judge_prompt=JUDGE).evaluation() == MethodConfig().selfeval
    assert judge_config().prompt == DEFAULT_JUDGE_PROMPT and judge_config().keep_word == "Yes"


def one_line_error(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1 and "Traceback" not in text, text
    return " ".join(text.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scorer", "rm", "--method", "best-of-n"], "--scorer rm needs --reward-model DIR"),
        (["--method", "best-of-n", "--reward-model", "rm"], "--reward-model is read only by --scorer rm"),
        (
            ["--method", "best-of-n", "--judge-prompt", "Right?"],
            "--judge-prompt is read only by --scorer judge",
        ),
        (
            ["--method", "best-of-n", "--scorer", "confidence", "--judge-prompt", "Right?"],
            "this run has --scorer confidence",
        ),
        (["--scorer", "rm", "--reward-model", "rm"], "--stop threshold needs a calibrated score"),
        (["--scorer", "judge", "--method", "greedy"], "--scorer is not used by greedy"),
        (["--scorer", "bogus"], "choose one of self-eval, confidence, self-certainty, rm, judge"),
        (
            ["--method", "best-of-n", "--scorer", "rm", "--reward-model", "/nonexistent/rm"],
            "reward model not found",
        ),
    ],
)
def test_run_errors_are_one_line(args, message):
    assert message in one_line_error(["run", PROMPT, *args])


def test_batch_errors_are_one_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    base = ["batch", str(prompts), "--budget", "2", "--out", str(tmp_path / "o.jsonl")]
    assert "--scorer rm needs --reward-model" in one_line_error([*base, "--scorer", "rm"])
    assert "--judge-prompt is read only by --scorer judge" in one_line_error(
        [*base, "--judge-prompt", "Right?"]
    )
    adaptive = [*base, "--method", "adaptive", "--scorer", "rm", "--reward-model", "x"]
    assert "--stop threshold needs a calibrated score" in one_line_error(adaptive)


def test_run_command_with_rm_and_judge(tiny_model_dir, reward_model_dir):
    import json

    common = ["run", PROMPT, "--model", str(tiny_model_dir), "--method", "best-of-n", "--n", "2"]
    common += ["--max-new-tokens", "6", "--json"]
    res = CliRunner().invoke(app, [*common, "--scorer", "rm", "--reward-model", str(reward_model_dir)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rm_reads"] == 2 and out["rm_tokens"] > 0 and out["self_evals"] == 0
    res = CliRunner().invoke(app, [*common, "--scorer", "judge", "--judge-prompt", JUDGE])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["self_evals"] == 2 and out["config"]["judge_prompt"] == JUDGE and out["rm_reads"] == 0


def test_batch_by_rm_counts_the_reward_models_tokens(backend, reward_model_dir):
    from sgl_adaptive.batch import BatchSettings, run_batch
    from sgl_adaptive.finetune.prompts import PromptItem

    items = [PromptItem(id=str(i), prompt=p) for i, p in enumerate(["What is 1 + 1?", "Name a colour."])]
    config = MethodConfig(n=2, scorer="rm", reward_model=str(reward_model_dir), **SMALL)
    records = run_batch(items, backend, BatchSettings(4, config=config))
    assert sum(r["samples"] for r in records) == 4
    assert all(r["rm_tokens"] > 0 and r["self_evals"] == 0 and None not in r["scores"] for r in records)


def test_serve_takes_the_judge_and_refuses_rm_without_a_reward_model():
    from sgl_adaptive.openai_protocol import ApiError, ServerLimits, parse_chat_request

    limits = ServerLimits(model="m")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "method": "best-of-n"}
    request = parse_chat_request({**body, "scorer": "judge", "judge_prompt": JUDGE}, limits)
    assert request.config.scorer == "judge" and request.config.evaluation().prompt == JUDGE
    with pytest.raises(ApiError, match="needs a reward model, and this server has none") as rm:
        parse_chat_request({**body, "scorer": "rm"}, limits)
    assert (rm.value.status, rm.value.param) == (400, "scorer")
    with pytest.raises(ApiError, match="unsupported field 'reward_model'") as path:
        parse_chat_request({**body, "reward_model": "/some/dir"}, limits)
    assert path.value.status == 400


# ---- one reward-model class --------------------------------------------------------------------------
def test_finetune_and_bench_use_the_library_reward_model(reward_model_dir, rm_by_hand):
    from sgl_adaptive.bench.reward import RewardModel as BenchRewardModel
    from sgl_adaptive.finetune.prompts import PromptItem
    from sgl_adaptive.finetune.rewards import reward_from_spec
    from sgl_adaptive.reward_model import RewardModel, shared

    assert BenchRewardModel is RewardModel
    reward = reward_from_spec(f"rm:{reward_model_dir}", device="cpu")
    assert reward.name == f"rm:{reward_model_dir}" and reward.verifier is False
    responses = ["Five.", "It is 5, because 2 + 3 = 5.", ""]
    expected = [rm_by_hand("2 + 3?", r)[0] for r in responses]
    assert reward(PromptItem(id="q", prompt="2 + 3?"), responses) == pytest.approx(
        expected, rel=1e-4, abs=1e-5
    )
    scored = RewardModel(str(reward_model_dir), "cpu", batch_size=2).score("2 + 3?", responses)
    assert scored.scores == pytest.approx(expected, rel=1e-4, abs=1e-5)  # padded batches score as solo rows
    assert scored.tokens == [rm_by_hand("2 + 3?", r)[1] for r in responses]
    assert shared(str(reward_model_dir)) is shared(str(reward_model_dir) + "/")
    with pytest.raises(UserError, match="reward model not found"):
        RewardModel("/nonexistent/reward-model")
    with pytest.raises(UserError, match="no config.json"):
        RewardModel(str(reward_model_dir.parent))
