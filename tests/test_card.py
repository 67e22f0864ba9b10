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
