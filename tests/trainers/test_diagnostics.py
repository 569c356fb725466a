"""Rank collapse and overfitting diagnostics (trainers/diagnostics.py) on hand-made and real LoRA weights."""
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from trainers.diagnostics import (EFFECTIVE_RANK, EFFECTIVE_RANK_RATIO, effective_rank, has_lora,
                                  low_rank_singular_values, overfit_gap, rank_figures)


def _factors_with_singular_values(values, d_out=24, d_in=40, seed=0):
    """B (d_out x r) and A (r x d_in) with B·A = U diag(values) Vᵀ, spread over all r columns of B."""
    generator = torch.Generator().manual_seed(seed)
    r = len(values)
    u, _ = torch.linalg.qr(torch.randn(d_out, r, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, r, generator=generator, dtype=torch.float64))
    mix, _ = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64))  # B and A both dense
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ mix, mix.T @ v.T


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.tensor([3.0, 3.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(torch.tensor([5.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(8)) == pytest.approx(8.0)
    assert effective_rank(torch.zeros(8)) == 0.0                       # an untrained update: no rank
    uneven = effective_rank(torch.tensor([10.0, 1.0, 0.1]))
    shares = [10 / 11.1, 1 / 11.1, 0.1 / 11.1]
    assert uneven == pytest.approx(math.exp(-sum(p * math.log(p) for p in shares)))
    assert 1.0 < uneven < 2.0


def test_singular_values_without_the_full_product_match_a_full_svd():
    b, a = _factors_with_singular_values([4.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    cheap = low_rank_singular_values(b, a, scale=0.5)
    full = torch.linalg.svdvals(0.5 * b @ a)[:8]
    assert torch.allclose(cheap, full, atol=1e-10)
    assert torch.allclose(cheap[:4], torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64))


def test_a_rank_two_update_in_an_r8_adapter_has_effective_rank_two():
    b, a = _factors_with_singular_values([3.0, 3.0, 0, 0, 0, 0, 0, 0])
    assert effective_rank(low_rank_singular_values(b, a)) == pytest.approx(2.0, abs=1e-6)
    b, a = _factors_with_singular_values([1.0] * 8)
    assert effective_rank(low_rank_singular_values(b, a)) == pytest.approx(8.0, abs=1e-6)


def test_rank_figures_of_a_peft_model(tiny_bert):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    assert has_lora(model)
    assert rank_figures(model) == {EFFECTIVE_RANK: 0.0, EFFECTIVE_RANK_RATIO: 0.0}   # B starts at zero
    for index, module in enumerate(m for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B):
        linear_b, linear_a = module.lora_B["default"].weight, module.lora_A["default"].weight
        b, a = _factors_with_singular_values([2.0, 2.0, 0, 0, 0, 0, 0, 0], d_out=linear_b.shape[0],
                                             d_in=linear_a.shape[1], seed=index)
        with torch.no_grad():
            linear_b.copy_(b.float())
            linear_a.copy_(a.float())
    figures = rank_figures(model)
    assert figures[EFFECTIVE_RANK] == pytest.approx(2.0, abs=1e-3)
    assert figures[EFFECTIVE_RANK_RATIO] == pytest.approx(2.0 / 8, abs=1e-3)


def test_no_rank_figures_without_lora(tiny_bert):
    from peft import IA3Config

    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert),
                           IA3Config(target_modules=["value"], feedforward_modules=[]))
    assert not has_lora(model) and rank_figures(model) == {}


def test_overfit_gap_is_eval_minus_train_loss():
    assert overfit_gap({"eval_loss": 0.9, "train_loss": 0.4}) == {"diag_overfit_gap": pytest.approx(0.5)}
