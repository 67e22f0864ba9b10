import math

import pytest

from sgl_adaptive.selfeval import (
    SelfEvalConfig,
    answer_token_ids,
    answer_variants,
    normalize_answer,
    score_from_logprobs,
    score_from_meta_info,
)

CFG = SelfEvalConfig()


def entry(p: float, token_id: int, text: str):
    return (math.log(p), token_id, text)


def test_score_is_renormalised_probability_of_no():
    s = score_from_logprobs([entry(0.6, 1, "No"), entry(0.2, 2, "Yes"), entry(0.1, 3, "I")], CFG)
    assert s.score == pytest.approx(0.75)
    assert s.answer_mass == pytest.approx(0.8)


def test_variants_with_leading_space_and_case_are_summed():
    entries = [
        entry(0.3, 1, "No"),
        entry(0.1, 2, " No"),
        entry(0.05, 3, "NO"),
        entry(0.15, 4, " yes"),
        entry(0.05, 5, "Yes"),
    ]
    s = score_from_logprobs(entries, CFG)
    assert s.p_keep == pytest.approx(0.45)
    assert s.p_retry == pytest.approx(0.2)
    assert s.score == pytest.approx(0.45 / 0.65)


def test_unrelated_tokens_do_not_count():
    s = score_from_logprobs(
        [entry(0.5, 1, "Not"), entry(0.2, 2, "Nope"), entry(0.1, 3, " Yesterday"), entry(0.1, 4, "Yes")], CFG
    )
    assert s.p_keep == 0.0
    assert s.score == 0.0


def test_a_token_listed_twice_counts_once():
    s = score_from_logprobs([entry(0.4, 7, "No"), entry(0.4, 7, "No"), entry(0.4, 8, "Yes")], CFG)
    assert s.score == pytest.approx(0.5)


def test_no_answer_tokens_gives_an_uninformative_half():
    assert score_from_logprobs([entry(0.9, 1, "Maybe")], CFG).score == 0.5


def test_custom_answer_words():
    cfg = SelfEvalConfig(prompt="Keep it?", keep_word="Keep", retry_word="Retry")
    assert score_from_logprobs([entry(0.3, 1, " keep"), entry(0.1, 2, "Retry")], cfg).score == pytest.approx(
        0.75
    )


def test_meta_info_prefers_exact_ids_over_top_k():
    meta = {
        "output_top_logprobs": [[entry(0.9, 1, "No")]],
        "output_token_ids_logprobs": [[entry(0.2, 1, "No"), entry(0.6, 2, "Yes")]],
    }
    assert score_from_meta_info(meta, CFG).score == pytest.approx(0.25)
    assert score_from_meta_info({"output_top_logprobs": meta["output_top_logprobs"]}, CFG).score == 1.0
    with pytest.raises(ValueError):
        score_from_meta_info({}, CFG)


def test_normalisation_and_variants():
    assert normalize_answer(" No.") == "no"
    assert {"No", " No", "no", " no", "NO", " NO"} <= set(answer_variants("No"))


def test_answer_token_ids_are_single_tokens_of_both_words(backend):
    ids = answer_token_ids(backend.tokenizer, CFG)
    assert set(ids.values()) == {"no", "yes"}
    for token_id, word in ids.items():
        assert normalize_answer(backend.tokenizer.decode([token_id])) == word


def test_config_rejects_identical_words():
    with pytest.raises(ValueError):
        SelfEvalConfig(keep_word="Yes", retry_word="yes")
