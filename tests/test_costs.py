import pytest

from sgl_adaptive.costs import CostMeter, ModelShape, request_flops

SHAPE = ModelShape(n_layers=2, hidden=4, attn_dim=4, vocab=10, body_params=100)


def test_request_flops_by_hand():
    # prompt 5 tokens, 2 cached -> positions 2,3,4 fed (attend 3+4+5 keys); 3 generated -> 2 fed (attend 6+7).
    flops = request_flops(SHAPE, prompt=5, cached=2, completion=3)
    body = 2 * 100 * (3 + 2)
    attention = 4 * 2 * 4 * ((3 + 4 + 5) + (6 + 7))
    head = 2 * 4 * 10 * 3
    assert flops == body + attention + head


def test_cached_tokens_are_cheaper():
    assert request_flops(SHAPE, 100, 90, 1) < request_flops(SHAPE, 100, 0, 1)


def test_meter_totals_split_samples_and_evaluations():
    meter = CostMeter()
    meter.start_round(2)
    meter.record("sample", {"prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": 5})
    meter.record("sample", {"prompt_tokens": 10, "cached_tokens": 9, "completion_tokens": 7})
    meter.record("eval", {"prompt_tokens": 40, "cached_tokens": 14, "completion_tokens": 1})
    totals = meter.totals(SHAPE, wall_s=1.5)
    assert (totals.samples, totals.batches) == (2, 1)
    assert totals.generated_tokens == 12
    assert totals.prefill_tokens == 10 + 1 + 26
    assert totals.cached_tokens == 23
    assert (totals.self_evals, totals.eval_prefill_tokens) == (1, 26)
    assert totals.eval_prefill_per_eval == 26
    assert totals.flops == pytest.approx(
        request_flops(SHAPE, 10, 0, 5) + request_flops(SHAPE, 10, 9, 7) + request_flops(SHAPE, 40, 14, 1)
    )
    assert meter.totals(None).flops is None


def test_shape_from_model_counts_body_parameters(backend):
    exact = ModelShape.from_model(backend.model)
    estimate = ModelShape.from_config(backend.model.config)
    assert exact.n_layers == estimate.n_layers
    assert abs(exact.body_params - estimate.body_params) / exact.body_params < 0.05
