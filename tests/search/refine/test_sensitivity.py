"""Sensitivity table and importances on made-up trials of known structure (no training)."""
import math

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from search.refine.sensitivity import (SensitivityRow, importances, marginal_effects, rating, sensitivity_table,
                                       to_markdown)
from search.store.results import trial_rows

DIST = {"learning_rate": FloatDistribution(1e-5, 1e-1, log=True),
        "dropout": FloatDistribution(0.0, 0.3),
        "target": CategoricalDistribution(["qv", "all"])}


def accuracy(lr, rng):
    # peaks at lr = 2e-3 (+0.3), falls off over about half a decade; dropout and target do nothing
    return 0.5 + 0.3 * math.exp(-(math.log10(lr / 2e-3) ** 2) / 0.3) + rng.normal(0, 0.003)


def made_up_study(n=30, seed=1, direction="maximize", extra_states=True):
    rng = np.random.default_rng(seed)
    study = optuna.create_study(direction=direction)
    for i in range(n):
        lr = float(10 ** rng.uniform(-5, -1))
        params = {"learning_rate": lr, "dropout": float(rng.uniform(0, 0.3)),
                  "target": ["qv", "all"][i % 2]}
        acc = accuracy(lr, rng)
        value = acc if direction == "maximize" else 2.0 - 2.0 * acc  # eval_loss falls as accuracy rises
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, value=value, params=params, distributions=DIST,
            user_attrs={**{f"param_{k}": v for k, v in params.items()},
                        "eval_accuracy": acc, "eval_loss": 2.0 - 2.0 * acc}))
    if extra_states:  # a pruned trial with an absurd value must not count
        study.add_trial(create_trial(state=TrialState.PRUNED, params={"learning_rate": 2e-3, "dropout": 0.1,
                                                                      "target": "qv"},
                                     distributions=DIST,
                                     user_attrs={"param_learning_rate": 2e-3, "param_dropout": 0.1,
                                                 "param_target": "qv", "eval_accuracy": -5.0}))
    return study


@pytest.fixture(scope="module")
def study():
    return made_up_study()


@pytest.fixture(scope="module")
def rows(study):
    return trial_rows(study.get_trials(), ["eval_accuracy"])


def test_table_rates_learning_rate_high_and_dropout_low(rows):
    table = sensitivity_table(rows, ["learning_rate", "dropout", "param_target"], "eval_accuracy", "max")
    assert all(isinstance(r, SensitivityRow) for r in table)
    assert [r.param for r in table][0] == "learning_rate"
    assert [r.impact_points for r in table] == sorted((r.impact_points for r in table), reverse=True)
    by = {r.param: r for r in table}
    lr = by["learning_rate"]
    assert lr.rating in ("VERY HIGH", "HIGH") and lr.impact_points > 4  # in points: accuracy x 100
    low, high = (float(v) for v in lr.optimal_range.split("–"))
    assert low <= 2e-3 <= high
    assert lr.impact_ci[0] <= lr.impact_points <= lr.impact_ci[1] + 1e-9
    assert "keep learning_rate in" in lr.guidance and "drops up to" in lr.guidance
    # pure noise: whatever swing binning 30 trials shows, it is within chance's (the noise floor)
    assert by["dropout"].rating == "LOW" and by["target"].rating == "LOW"
    assert by["dropout"].impact_points < lr.noise_floor < lr.impact_points
    assert by["target"].range_tested in ("all, qv", "qv, all")
    assert "barely" in by["dropout"].guidance


def test_marginal_effects_bins_and_counts(rows):
    bins = marginal_effects(rows, "learning_rate", "eval_accuracy", "max")
    assert 2 <= len(bins) <= 4 and sum(b.n for b in bins) == 30  # the pruned row is left out
    assert all(b.ci_low <= b.mean <= b.ci_high for b in bins)
    # spans four decades: edges in log space, so bins are about a decade wide each
    assert bins[0].high < 1e-3 and bins[-1].low > 1e-3
    cats = marginal_effects(rows, "target", "eval_accuracy", "max")
    assert sorted(b.label for b in cats) == ["all", "qv"] and all(b.n == 15 for b in cats)
    with pytest.raises(ValueError):
        marginal_effects(rows, "target", "eval_accuracy", "best")


def test_min_mode_metric_in_raw_units():
    study = made_up_study(direction="minimize", extra_states=False)
    rows = trial_rows(study.get_trials(), ["eval_loss"])
    table = sensitivity_table(rows, None, "eval_loss", "min")
    by = {r.param: r for r in table}
    assert table[0].param == "learning_rate"
    # eval_loss is not a [0,1] score: raw units, the swing is about 2 * 0.3 = 0.6 at most
    lr = by["learning_rate"]
    assert 0.3 < lr.impact_points < 0.6 and lr.rating == rating(max(0.0, lr.impact_points - lr.noise_floor))
    assert 0 < lr.noise_floor < lr.impact_points
    low, high = (float(v) for v in lr.optimal_range.split("–"))
    assert low <= 2e-3 <= high
    assert by["dropout"].rating == "LOW"
    imp = importances(study)
    assert max(imp["fanova"], key=imp["fanova"].get) == "learning_rate"


def test_importances_rank_learning_rate_first(study):
    imp = importances(study)
    assert set(imp) == {"fanova", "ped_anova"} and imp.reason == ""
    assert max(imp["fanova"], key=imp["fanova"].get) == "learning_rate"
    assert max(imp["ped_anova"], key=imp["ped_anova"].get) == "learning_rate"
    assert imp == importances(study)  # seeded: same answer twice


def test_too_few_trials_or_one_value_give_a_reason_not_a_crash():
    small = made_up_study(n=3)
    imp = importances(small)
    assert imp == {} and "3 complete" in imp.reason
    flat = optuna.create_study()
    for lr in (1e-4, 1e-3, 1e-2, 1e-1):
        flat.add_trial(create_trial(value=0.5, params={"learning_rate": lr},
                                    distributions={"learning_rate": DIST["learning_rate"]}))
    imp = importances(flat)
    assert imp == {} and "same objective value" in imp.reason
    empty = importances(optuna.create_study())
    assert empty == {} and empty.reason
    rows = trial_rows(small.get_trials(), ["eval_accuracy"])
    table = sensitivity_table(rows, ["learning_rate", "missing"], "eval_accuracy", "max")
    assert [r.param for r in table] == ["learning_rate"]  # a setting no trial has is left out
    assert sensitivity_table([], ["learning_rate"], "eval_accuracy", "max") == []


def test_same_seed_same_result_and_markdown(rows):
    one = sensitivity_table(rows, None, "eval_accuracy", "max", seed=3)
    assert one == sensitivity_table(rows, None, "eval_accuracy", "max", seed=3)
    md = to_markdown(one)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| Setting | Range tested | Optimal range | Impact (points)")
    assert len(lines) == 2 + len(one) == 5 and "learning_rate" in lines[2]


def test_rating_thresholds():
    assert [rating(x) for x in (23, 4.01, 4, 1, 0.99, 0.5, 0.49, 0)] == \
        ["VERY HIGH", "VERY HIGH", "HIGH", "HIGH", "MEDIUM", "MEDIUM", "LOW", "LOW"]


def test_summary_tables_for_wandb(study, rows):
    from search.refine.sensitivity import summary_tables

    tables = summary_tables(rows, study, "eval_accuracy", "max")
    assert tables["sensitivity"][0]["setting"] == "learning_rate"
    assert tables["sensitivity"][0]["rating"] in ("HIGH", "VERY HIGH")
    evaluators = {r["evaluator"] for r in tables["importances"]}
    assert evaluators == {"fanova", "ped_anova"}
    assert {r["param"] for r in tables["importances"]} == set(DIST)
    few = [r for r in rows if r["number"] < 3]
    assert summary_tables(few, study, "eval_accuracy", "max") == {}
