"""The programs' semantics on the in-process backend (stopping, pruning, selection, costs, errors)."""

from __future__ import annotations

import pytest

from sgl_adaptive import MethodConfig, run
from sgl_adaptive.backends.local import LocalBackend
from sgl_adaptive.errors import ProgramError, PromptTooLongError, UserError
from sgl_adaptive.programs.adaptive_pruning import round_keep

PROMPT = "What is 2 + 3?"
SMALL = dict(max_new_tokens=16, prune_at=6, temperature=1.0)


def eval_suffix_tokens(backend: LocalBackend) -> int:
    roles = backend.chat_template.role_prefix_and_suffix
    suffix = (
        roles["assistant"][1]
        + roles["user"][0]
        + backend.selfeval.prompt
        + roles["user"][1]
        + roles["assistant"][0]
    )
    return len(backend.tokenizer.encode(suffix, add_special_tokens=False))


def test_greedy_is_one_sample_without_evaluation(backend):
    r = run(PROMPT, backend, "greedy", **SMALL)
    assert (r.costs.samples, r.costs.batches, r.costs.self_evals) == (1, 1, 0)
    assert r.candidates[0].temperature == 0.0 and r.score is None
    assert r.answer == run(PROMPT, backend, "greedy", **SMALL).answer


def test_best_of_n_returns_the_argmax_and_evaluates_in_a_side_branch(backend):
    r = run(PROMPT, backend, "best-of-n", n=6, **SMALL)
    scores = [c.score for c in r.candidates]
    assert len(scores) == 6 and all(s is not None for s in scores)
    assert r.best == max(range(6), key=lambda i: (scores[i], -i))
    assert r.costs.self_evals == 6
    assert all(backend.selfeval.prompt not in c.text for c in r.candidates)


def test_threshold_zero_stops_after_the_first_sample(backend):
    r = run(PROMPT, backend, "adaptive", n=16, threshold=0.0, **SMALL)
    assert (r.costs.samples, r.costs.batches) == (1, 1)
    assert r.candidates[0].temperature == 0.0  # annealing: the first sample is greedy


def test_unreachable_threshold_draws_the_budget_in_doubling_batches(backend):
    r = run(PROMPT, backend, "adaptive", n=8, threshold=1.0, **SMALL)
    assert (r.costs.samples, r.costs.batches) == (8, 4)
    assert [c.round for c in r.candidates] == [0, 1, 2, 2, 3, 3, 3, 3]
    temps = [c.temperature for c in r.candidates]
    assert temps == pytest.approx([1.0 * (1 - 2.0**-k) for k in range(8)])


def test_early_pruning_finishes_exactly_keep_samples(endless_backend):
    r = run(PROMPT, endless_backend, "prune", n=6, keep=2, **SMALL)
    continued = [c for c in r.candidates if len(c.scores) == 2]
    pruned = [c for c in r.candidates if c.pruned]
    assert len(continued) == 2 and len(pruned) == 4
    first = sorted(r.candidates, key=lambda c: -c.scores[0][1])
    assert {id(c) for c in continued} == {id(c) for c in first[:2]}
    assert all(c.tokens == 16 for c in continued) and all(c.tokens == 6 for c in pruned)
    assert r.best in [r.candidates.index(c) for c in continued]
    assert r.costs.self_evals == 6 + 2
    assert r.costs.generated_tokens == 6 * 6 + 2 * 10


def test_adaptive_pruning_prunes_every_round(endless_backend):
    r = run(PROMPT, endless_backend, "adaptive-prune", n=8, keep=2, threshold=1.0, **SMALL)
    assert (r.costs.samples, r.costs.batches) == (8, 4)
    by_round = {}
    for c in r.candidates:
        by_round.setdefault(c.round, []).append(c)
    for size_round in by_round.values():
        finished = [c for c in size_round if c.tokens == 16]
        assert len(finished) == round_keep(len(size_round), 2, 8)
    assert round_keep(1, 2, 8) == 1 and round_keep(4, 2, 8) == 1 and round_keep(8, 4, 16) == 2


def test_evaluation_prefills_only_the_evaluation_turn(endless_backend):
    suffix = eval_suffix_tokens(endless_backend)
    for method in ("best-of-n", "prune"):
        r = run(PROMPT, endless_backend, method, n=4, keep=2, **SMALL)
        assert r.costs.eval_prefill_per_eval <= suffix + 2, method


def test_forks_are_decoded_in_one_batch(backend):
    before = dict(backend.engine.stats)
    run(PROMPT, backend, "best-of-n", n=8, **SMALL)
    steps = backend.engine.stats["decode_steps"] - before["decode_steps"]
    rows = backend.engine.stats["decoded_rows"] - before["decoded_rows"]
    assert rows / steps > 4


def test_same_seed_same_result(backend):
    a = run(PROMPT, backend, "best-of-n", n=4, seed=7, **SMALL)
    b = run(PROMPT, backend, "best-of-n", n=4, seed=7, **SMALL)
    assert sorted(c.text for c in a.candidates) == sorted(c.text for c in b.candidates)


def test_result_json_has_the_documented_keys(backend):
    out = run(PROMPT, backend, "adaptive", n=2, **SMALL).to_dict()
    for key in (
        "answer",
        "method",
        "samples",
        "batches",
        "candidates",
        "tokens",
        "self_evals",
        "eval_prefill",
        "flops",
        "wall_s",
    ):
        assert key in out
    assert set(out["tokens"]) == {"generated", "prefill", "cached"}
    assert set(out["candidates"][0]) >= {"text", "score", "finished", "tokens"}
    assert out["flops"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n=0), "--n"),
        (dict(threshold=1.5), "--threshold"),
        (dict(threshold=-0.1), "--threshold"),
        (dict(max_new_tokens=0), "--max-new-tokens"),
    ],
)
def test_bad_options_are_user_errors(backend, overrides, message):
    with pytest.raises(UserError, match=message):
        run(PROMPT, backend, "adaptive", **overrides)


def test_keep_above_n_is_refused_for_pruning_only(backend):
    with pytest.raises(UserError, match="--keep"):
        MethodConfig(n=2, keep=3).check_for("prune")
    MethodConfig(n=2, keep=3).check_for("best-of-n")


def test_empty_prompt_and_unknown_method(backend):
    with pytest.raises(UserError, match="empty"):
        run("   ", backend, "greedy")
    with pytest.raises(UserError, match="unknown method"):
        run(PROMPT, backend, "beam")


def test_prompt_too_long_surfaces_from_the_forks(backend):
    long_prompt = "seven " * (backend.context_length + 10)
    for method in ("greedy", "best-of-n"):
        with pytest.raises(PromptTooLongError):
            run(long_prompt, backend, method, n=2, **SMALL)


class FailingForks(LocalBackend):
    """Fails every sampled (temperature > 0) request, as a dying server would."""

    def complete(self, text, sampling_params, token_ids_logprob=None):
        if sampling_params.temperature > 0:
            raise RuntimeError("boom")
        return super().complete(text, sampling_params, token_ids_logprob)


def test_a_failing_fork_is_not_dropped(tiny_model_dir):
    failing = FailingForks.from_pretrained(str(tiny_model_dir), device="cpu")
    with pytest.raises(ProgramError, match="boom"):
        run(PROMPT, failing, "best-of-n", n=3, **SMALL)
    failing.shutdown()


def test_sample_pool_scores_every_budget(endless_backend):
    from sgl_adaptive.programs import sample_pool
    from sgl_adaptive.runner import run_program

    config = MethodConfig(n=3, max_new_tokens=12, temperature=1.0)
    r = run_program(sample_pool, PROMPT, endless_backend, config, name="pool", budgets=(4, 8, 30))
    assert len(r.candidates) == 3
    assert all([t for t, _ in c.scores] == [4, 8, 12] for c in r.candidates)
    assert r.costs.self_evals == 9 and r.costs.batches == 1


class RecordingBackend(LocalBackend):
    """Remembers the text of every one-token request (the self-evaluations)."""

    def complete(self, text, sampling_params, token_ids_logprob=None):
        if sampling_params.max_new_tokens == 1:
            self.eval_texts.append(text)
        return super().complete(text, sampling_params, token_ids_logprob)


def test_training_text_equals_what_the_programs_send(tiny_model_dir):
    from sgl_adaptive.chat_template import render_selfeval_prompt

    rec = RecordingBackend.from_pretrained(str(tiny_model_dir), device="cpu")
    rec.eval_texts = []
    rec.engine.eos_token_ids = frozenset()  # both samples reach the pruning point unfinished
    r = run(PROMPT, rec, "prune", n=2, keep=1, **SMALL)
    final = [c for c in r.candidates if len(c.scores) == 2]
    assert len(final) == 1 and len(rec.eval_texts) == 3
    assert (
        render_selfeval_prompt(rec.chat_template, PROMPT, final[0].text, rec.selfeval.prompt)
        in rec.eval_texts
    )
    rec.shutdown()


def test_the_prompt_prefill_is_metered_once(endless_backend):
    endless_backend.flush_cache()
    template = endless_backend.chat_template
    prompt_text = template.get_prompt([{"role": "user", "content": PROMPT}])
    opened = prompt_text + template.role_prefix_and_suffix["assistant"][0]
    encode = endless_backend.tokenizer.encode
    prompt_len, opened_len = len(encode(prompt_text)), len(encode(opened))
    r = run(PROMPT, endless_backend, "best-of-n", n=4, **SMALL)
    suffix = eval_suffix_tokens(endless_backend)
    # the prompt once; the assistant-turn opening once (the other forks: one token each, as a server
    # reports a full cache hit); per evaluation the last sampled token + the evaluation turn
    assert r.costs.prefill_tokens == prompt_len + (opened_len - prompt_len) + 3 * 1 + 4 * (suffix + 1)


def test_a_majority_vote_without_scores_skips_the_self_evaluation(backend):
    r = run(PROMPT, backend, "best-of-n", n=4, selector="majority", **SMALL)
    assert r.costs.self_evals == 0 and all(c.score is None for c in r.candidates)
    a = run(PROMPT, backend, "adaptive", n=4, selector="majority", stop="esc", **SMALL)
    assert a.costs.self_evals == 0
    w = run(PROMPT, backend, "adaptive", n=4, selector="majority", stop="threshold", threshold=1.0, **SMALL)
    assert w.costs.self_evals == 4  # the threshold rule reads scores


def test_the_stop_and_selector_options_belong_to_the_methods_that_read_them():
    from sgl_adaptive.config import check_options_used

    check_options_used("adaptive", {"stop", "selector", "stop_window"})
    check_options_used("best-of-n", {"selector", "vote_temperature"})
    with pytest.raises(UserError, match="--stop is not used by best-of-n"):
        check_options_used("best-of-n", {"stop"})
    with pytest.raises(UserError, match="--selector is not used by greedy"):
        check_options_used("greedy", {"selector"})


def test_progress_reports_each_round_when_nothing_is_evaluated(backend):
    lines: list[str] = []
    r = run(PROMPT, backend, "adaptive", n=4, selector="majority", stop="esc", progress=lines.append, **SMALL)
    assert r.costs.self_evals == 0 and r.costs.batches == 3
    assert [line for line in lines if line.startswith("round")] == [
        f"round {i}: sampling …" for i in (1, 2, 3)
    ], lines
