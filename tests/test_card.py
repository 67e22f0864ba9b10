"""The rule that makes a trained adapter the default model."""

from __future__ import annotations

from sgl_adaptive.finetune.card import becomes_default


def _cv(gain, low, high):
    return {
        "report": {
            "best_of_n": {
                "pool_size": 8.0,
                "selected_minus_first": gain,
                "selected_minus_first_ci": [low, high],
            }
        }
    }


def test_an_adapter_becomes_the_default_only_above_its_interval_and_without_drift():
    assert becomes_default(_cv(0.08, 0.02, 0.14), 0.97)[0]
    ok, why = becomes_default(_cv(0.05, -0.01, 0.11), 0.99)
    assert not ok and "not above its interval" in why
    ok, why = becomes_default(_cv(0.08, 0.02, 0.14), 0.90)
    assert not ok and "agree" in why
    assert not becomes_default(_cv(0.08, 0.02, 0.14), None)[0]
    assert not becomes_default(_cv(0.0, 0.0, 0.1), 1.0)[0]  # a lower end of exactly 0 is not above it
    trained, untrained = _cv(0.08, 0.02, 0.14), _cv(0.1, 0.05, 0.15)
    trained["report"]["best_of_n"]["selected"], untrained["report"]["best_of_n"]["selected"] = 0.26, 0.28
    ok, why = becomes_default(trained, 0.99, untrained)
    assert not ok and "below the untrained model's 0.280" in why
    assert becomes_default(untrained, 0.99, trained)[0]


def test_greedy_comparison_counts_the_shared_questions(tmp_path):
    import json

    import pytest

    from sgl_adaptive.errors import UserError
    from sgl_adaptive.finetune.experiments import greedy_comparison

    def write(folder, rows):
        folder.mkdir()
        lines = [
            {"kind": "result", "method": "greedy", "qid": q, "answer": a, "correct": c, "response": a}
            for q, a, c in rows
        ]
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    write(tmp_path / "base", [("q1", "4", True), ("q2", "7", False), ("q3", "1", False)])
    write(tmp_path / "trained", [("q1", "4", True), ("q2", "8", True), ("q4", "2", False)])
    got = greedy_comparison(tmp_path / "base", tmp_path / "trained")
    assert got == {
        "questions": 2,
        "base_accuracy": 0.5,
        "accuracy": 1.0,
        "agreement": 0.5,
        "same_response": 0.5,
    }
    write(tmp_path / "other", [("q9", "1", True)])
    with pytest.raises(UserError, match="share no finished greedy question"):
        greedy_comparison(tmp_path / "base", tmp_path / "other")


def test_the_card_renders_the_committed_reports():
    import json
    from pathlib import Path

    from sgl_adaptive.finetune.card import becomes_default, model_card

    results = Path(__file__).parent.parent / "bench" / "results" / "selfeval-cpu"
    trained = json.loads((results / "k1-hard.json").read_text())
    untrained = json.loads((results / "untrained.json").read_text())
    decision = becomes_default(trained, None)
    assert not decision[0]  # the committed run's Best-of-8 gain is not above its interval
    training = {
        "settings": trained["settings"],
        "base_sha256": trained["cache"]["model_sha256"],
        "data_sha256": trained["cache"]["data_sha256"],
        "prompts": 342,
        "run": {"steps": 171},
    }
    card = model_card(
        training=training,
        trained=trained,
        untrained=untrained,
        decision=decision,
        drift=None,
        greedy={
            "questions": 37,
            "base_accuracy": 0.135,
            "accuracy": 0.162,
            "agreement": 0.405,
            "same_response": 0.135,
            "control": {"questions": 37, "agreement": 0.919, "same_response": 0.757},
        },
        times=[("cache", 3960.0, 4500)],
        commands=["sgl-adaptive finetune top ..."],
    )
    assert "| Best-of-8 by the score | 0.281 | 0.249 |" in card
    assert "**Default model:** no" in card and "| cache | 66.0 min | 4.4 GiB |" in card
    assert "the final answers agree on 0.405 of questions" in card
    assert "A second greedy run of the base agrees with the first on 0.919" in card


def test_the_committed_adapter_card_agrees_with_the_committed_reports():
    """The CPU-trained adapter in bench/results was trained with the cross-validated setting, and its
    recorded decision is the rule's on the committed reports; it is not installed as the default."""
    import json
    from pathlib import Path

    from sgl_adaptive.finetune.card import becomes_default
    from sgl_adaptive.model_store import shipped_adapter

    results = Path(__file__).parent.parent / "bench" / "results" / "selfeval-cpu"
    adapter = results / "adapter"
    training = json.loads((adapter / "training.json").read_text())
    card = json.loads((adapter / "card.json").read_text())
    report = json.loads((results / "k1-hard-lr1e-3-e3.json").read_text())
    untrained = json.loads((results / "untrained.json").read_text())
    assert training["settings"] == report["settings"] and training["prompts"] == 342
    default, why = becomes_default(report, card["greedy"]["agreement"], untrained)
    assert card["decision"] == {"default": default, "why": why} and not default
    assert card["greedy"]["control"]["agreement"] > card["greedy"]["agreement"]
    assert shipped_adapter() is None  # so the default model stays the base
    assert (adapter / "adapter_model.safetensors").stat().st_size < 2_000_000
