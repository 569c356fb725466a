"""The pack cost model (trainers/packing/cost_model.py): its analytic form, its fit and the choice of K, on made-up
shapes and measurements (no torch, no training)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from trainers.packing.cost_model import (LOGIT_BYTES, BaseShape, Coefficients, CostModel, Measurement, MemberShape,
                                         choose_k, lora_params)

# A LLaMA-1B-like shape (16 layers, hidden 2048, vocab 128k), as the benchmarks use it
BASE = BaseShape(params=1_236_000_000, matmul_params=1_236_000_000 - 262_000_000,
                 quantized_params=1_236_000_000 - 2 * 262_000_000, hidden=2048, layers=16, logit_width=128_256,
                 dtype_bytes=2)
TARGETS = [(2048, 2048), (2048, 512), (2048, 512), (2048, 2048)] * 16   # q, k, v, o per layer
COEF = Coefficients(fixed_bytes=300e6, act_bytes=34.0, flops_per_s=2e14, step_s=0.09, member_s=0.004)
MODEL = CostModel(BASE, COEF)


def member(rank=16, rows=1, seq=512, optimizer="adamw"):
    return MemberShape(rows, seq, lora_params(rank, TARGETS), optimizer)


@pytest.mark.parametrize("change", [dict(rank=64), dict(rows=4), dict(seq=2048)], ids=["rank", "rows", "seq"])
def test_memory_and_time_grow_with_rank_rows_and_length(change):
    small, large = member(), member(**change)
    assert MODEL.memory_bytes([large]) > MODEL.memory_bytes([small])
    assert MODEL.step_s([large]) > MODEL.step_s([small])


def test_memory_and_time_grow_with_k_but_tokens_per_s_saturates():
    memory = [MODEL.memory_bytes([member()] * k) for k in range(1, 9)]
    seconds = [MODEL.step_s([member()] * k) for k in range(1, 9)]
    speed = [MODEL.tokens_per_s([member()] * k) for k in range(1, 9)]
    assert memory == sorted(memory) and seconds == sorted(seconds) and len(set(memory)) == 8
    gains = [b / a for a, b in zip(speed, speed[1:])]
    assert all(gain > 1 for gain in gains) and gains == sorted(gains, reverse=True)


def test_quantized_bases_hold_fewer_bytes():
    none, nf4, int8 = (replace(BASE, quantization=q) for q in ("none", "nf4", "int8"))
    assert nf4.weight_bytes() < int8.weight_bytes() < none.weight_bytes()
    # the unquantized part (embeddings, norms) stays in the compute dtype
    assert nf4.weight_bytes() > (BASE.params - BASE.quantized_params) * BASE.dtype_bytes
    assert CostModel(nf4, COEF).memory_bytes([member()]) < CostModel(none, COEF).memory_bytes([member()])


def test_paged_8bit_optimizer_state_is_smaller():
    assert MODEL.memory_bytes([member(optimizer="paged_adamw_8bit")]) < MODEL.memory_bytes([member()])


def test_a_classifier_keeps_no_per_token_logits():
    classifier = CostModel(replace(BASE, logit_width=0), COEF)
    difference = MODEL.memory_bytes([member()]) - classifier.memory_bytes([member()])
    assert difference == pytest.approx(LOGIT_BYTES * 512 * 128_256)


def _synthetic(model, points):
    return [Measurement(tuple(member(rows=rows, seq=seq) for _ in range(k)), model.memory_bytes([member(rows=rows, seq=seq)] * k),
                        model.step_s([member(rows=rows, seq=seq)] * k)) for k, rows, seq in points]


def test_fit_recovers_the_coefficients_that_made_the_measurements():
    measurements = _synthetic(MODEL, [(1, 1, 256), (1, 1, 512), (2, 1, 512), (4, 2, 512)])
    fitted = CostModel(BASE).fitted(measurements).coef   # from the default priors
    for name in ("fixed_bytes", "act_bytes", "flops_per_s", "step_s", "member_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(COEF, name), rel=1e-6), name


def test_fit_from_two_pack_sizes_of_one_shape_still_predicts_that_shape():
    """K=1 and K=2 alone cannot split per-member seconds from per-FLOP ones; the prediction for more members
    of the same shape is right all the same."""
    measurements = _synthetic(MODEL, [(1, 1, 512), (2, 1, 512)])
    fitted = CostModel(BASE).fitted(measurements)
    for k in (3, 8, 16):
        assert fitted.step_s([member()] * k) == pytest.approx(MODEL.step_s([member()] * k), rel=1e-6)
        assert fitted.memory_bytes([member()] * k) == pytest.approx(MODEL.memory_bytes([member()] * k), rel=1e-6)


def test_fit_keeps_costs_nonnegative_under_noise():
    measurements = _synthetic(MODEL, [(1, 1, 512), (2, 1, 512), (1, 1, 256)])
    # the bigger pack measured faster than the smaller (a noisy CPU): no negative seconds come out of it
    measurements[1] = replace(measurements[1], step_s=measurements[0].step_s * 0.9)
    coef = CostModel(BASE).fitted(measurements).coef
    assert min(coef.step_s, coef.member_s, coef.act_bytes, coef.flops_per_s) >= 0


def test_choice_respects_the_memory_budget():
    one = member()
    budget = (MODEL.memory_bytes([one] * 3) + MODEL.memory_bytes([one] * 4)) / 2   # fits 3, not 4
    choice = choose_k(MODEL, one, budget, k_max=16, min_gain=0.0)
    assert choice.k == 3 and "budget" in choice.reason
    assert [row["k"] for row in choice.rows] == [1, 2, 3, 4]


def test_choice_stops_where_one_more_member_adds_too_little():
    one = member()
    choice = choose_k(MODEL, one, budget_bytes=1e15, k_max=16, min_gain=0.05)
    gains = [row["gain"] for row in choice.rows]
    assert gains[choice.k - 1] is None or gains[choice.k - 1] >= 0.05
    assert gains[choice.k] < 0.05 and "tokens/s" in choice.reason
    assert 1 < choice.k < 16


def test_choice_is_capped_and_never_below_one():
    one = member()
    assert choose_k(MODEL, one, 1e15, k_max=4, min_gain=0.0).k == 4
    assert choose_k(MODEL, one, budget_bytes=1.0, k_max=4).k == 1


def test_model_round_trips_through_its_dict():
    assert CostModel.from_dict(MODEL.to_dict()) == MODEL
