"""Refinement fed made-up trial results of known structure (no training, no Ray cluster).

The made-up task: accuracy peaks at learning_rate 3e-4 (a sub-range of 1e-5..1e-2) and falls off
steeply, rank r is best at 8, alpha_ratio 1 costs 8 points (2 and 4 are equal), lora_dropout does
nothing; a little seeded noise on top.
"""
import math

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search.refine.refiner import Refiner, RefineSettings, plan_refinement, searched_params
from search.refine.sampler import RefinedSampler
from search.run.searcher import PeftOptunaSearch, make_sampler
from search.spec.search_spec import SpecError, parse_spec
from search.store.keys import DIAG_PREFIX, REFINEMENT_ATTR, REFINEMENTS_ATTR, ROUNDS_TOTAL_KEY, STOPPED_EARLY_KEY
from search.store.results import trial_rows

SPACE = {
    "r": {"power_of_two": [2, 32]},
    "alpha_ratio": [1, 2, 4],
    "learning_rate": {"low": 1.0e-5, "high": 1.0e-2, "log": True},
    "lora_dropout": {"low": 0.0, "high": 0.2},
}


def make_spec(space=None, objective=None, **search):
    raw = {"name": "refine-test", "model": {"name_or_path": "minilm"},
           "data": {"train": "train.jsonl", "label_field": "label"}, "peft": {"method": "lora"},
           "space": space or SPACE, "objective": objective or {"metric": "eval_accuracy", "mode": "max"},
           "search": {"algorithm": "tpe", "trials": 30, "refine_every": 5, **search}, "tracking": {"wandb": "disabled"}}
    return parse_spec(raw, check_files=False, check_model=False)


def accuracy(values, noise):
    lr_cost = 0.12 * (math.log10(values["learning_rate"]) - math.log10(3e-4)) ** 2
    r_cost = 0.02 * abs(math.log2(values["r"]) - 3)
    alpha_cost = 0.08 if values["alpha_ratio"] == 1 else 0.0
    return 0.95 - lr_cost - r_cost - alpha_cost + noise


def made_up_rows(n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(n):
        values = {"learning_rate": float(10 ** rng.uniform(-5, -2)), "r": int(2 ** rng.integers(1, 6)),
                  "alpha_ratio": [1, 2, 4][number % 3], "lora_dropout": float(rng.uniform(0, 0.2))}
        rows.append({"number": number, "state": "COMPLETE", **{f"param_{k}": v for k, v in values.items()},
                     "eval_accuracy": accuracy(values, float(rng.normal(0, 0.003)))})
    return rows


IMPORTANCE = {"learning_rate": 0.7, "r": 0.12, "alpha_ratio": 0.15, "lora_dropout": 0.03}
SETTINGS = RefineSettings(every=5)


def decades(low, high):
    return math.log10(high) - math.log10(low)


def test_irrelevant_setting_is_fixed_and_important_ones_narrowed_around_their_optimum():
    rows = made_up_rows()
    plan = plan_refinement(rows, searched_params(make_spec()), "eval_accuracy", "max", IMPORTANCE, SETTINGS)
    best = max(rows, key=lambda r: r["eval_accuracy"])
    assert plan.fixed == {"lora_dropout": best["param_lora_dropout"]}
    low, high = plan.narrowed["learning_rate"]
    assert 1e-5 < low <= 3e-4 <= high < 1e-2
    assert decades(low, high) >= 0.25 * 3 - 1e-9          # never below the safe minimum width
    assert plan.narrowed["alpha_ratio"] == [2, 4]           # the bad category goes, the good ones stay
    r_low, r_high = plan.narrowed.get("r", [2, 32])
    assert r_low <= 8 <= r_high and math.log2(r_low).is_integer() and math.log2(r_high).is_integer()
    assert "lora_dropout fixed" in "; ".join(plan.notes) and "learning_rate narrowed" in "; ".join(plan.notes)


def test_minimum_width_holds():
    rows = made_up_rows()
    wide = RefineSettings(every=5, min_width=0.6)
    plan = plan_refinement(rows, searched_params(make_spec()), "eval_accuracy", "max", IMPORTANCE, wide)
    low, high = plan.narrowed["learning_rate"]
    assert decades(low, high) >= 0.6 * 3 - 1e-9 and low <= 3e-4 <= high


def test_unknown_importance_changes_nothing():
    rows = made_up_rows()
    plan = plan_refinement(rows, searched_params(make_spec()), "eval_accuracy", "max",
                           {name: None for name in IMPORTANCE}, SETTINGS)
    assert not plan.changed and "learning_rate VERY HIGH (importance unknown)" in plan.notes[0]


def test_swing_beyond_noise_without_importance_is_not_narrowed():
    # TPE draws settings together, so an irrelevant one can show a binned swing: importance must agree
    rows = made_up_rows()
    plan = plan_refinement(rows, searched_params(make_spec()), "eval_accuracy", "max",
                           {**IMPORTANCE, "learning_rate": 0.05}, SETTINGS)
    assert "learning_rate" not in plan.narrowed and "alpha_ratio" in plan.narrowed


def test_never_fixes_every_setting():
    rows = made_up_rows()
    for row in rows:   # nothing matters any more: only noise is left
        row["eval_accuracy"] = 0.9 + 0.001 * ((row["number"] * 7919) % 5)
    unimportant = {"learning_rate": 0.01, "r": 0.03, "alpha_ratio": 0.02, "lora_dropout": 0.04}
    plan = plan_refinement(rows, searched_params(make_spec()), "eval_accuracy", "max", unimportant, SETTINGS)
    assert len(plan.fixed) == 3 and "lora_dropout" not in plan.fixed   # the most important one stays searched


def test_later_refinement_stays_inside_the_region_in_force():
    rows = made_up_rows()
    current = {"learning_rate": [1e-4, 2e-3]}
    plan = plan_refinement(rows, searched_params(make_spec()), "eval_accuracy", "max", IMPORTANCE, SETTINGS,
                           narrowed=current)
    if "learning_rate" in plan.narrowed:
        low, high = plan.narrowed["learning_rate"]
        assert 1e-4 <= low <= 3e-4 <= high <= 2e-3


def test_minimising_objective_narrows_towards_low_loss():
    rows = made_up_rows()
    for row in rows:
        row["eval_loss"] = 1.0 - row.pop("eval_accuracy")
    plan = plan_refinement(rows, searched_params(make_spec()), "eval_loss", "min", IMPORTANCE, SETTINGS)
    low, high = plan.narrowed["learning_rate"]
    assert low <= 3e-4 <= high and decades(low, high) < 3


# --- the searcher continues the same study after refining -----------------------------------------------
def run_searcher(spec, storage, trials, rng_seed=0, searcher=None):
    searcher = searcher or PeftOptunaSearch(
        space=spec.search_space(), metric="eval_accuracy", mode="max", sampler=make_sampler("tpe", 0),
        study_name="refine", storage=storage, decode=spec.decode, refiner=Refiner.from_spec(spec))
    rng = np.random.default_rng(rng_seed)
    start = len(searcher._ot_study.trials)
    for k in range(start, start + trials):
        trial_id = f"t{k}"
        config = searcher.suggest(trial_id)
        values = spec.decode({name: config[name] for name in spec.search_space()})
        acc = accuracy(values, float(rng.normal(0, 0.003)))
        result = {"round": 1, "training_iteration": 1, "eval_accuracy": acc, ROUNDS_TOTAL_KEY: 1}
        searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)
    return searcher


@pytest.fixture
def storage(tmp_path):
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/refine.db")   # what a search uses


def test_searcher_refines_and_continues_the_same_study(storage):
    spec = make_spec()
    searcher = run_searcher(spec, storage, 34)
    study = searcher._ot_study
    refinements = study.user_attrs[REFINEMENTS_ATTR]
    assert refinements and refinements[0]["after_trials"] >= 10
    first = refinements[0]
    assert set(first) == {"after_trials", "fixed", "narrowed", "reason"} and first["reason"]
    lr_ranges = [entry["narrowed"]["learning_rate"] for entry in refinements if "learning_rate" in entry["narrowed"]]
    assert lr_ranges and all(low <= 3e-4 <= high and decades(low, high) < 3 for low, high in lr_ranges)
    assert all("learning_rate" not in entry["fixed"] for entry in refinements)
    trials = study.get_trials()
    assert len(trials) == 34 and all(t.state == TrialState.COMPLETE for t in trials)   # earlier trials kept
    original = spec.search_space()
    assert all(t.distributions == original for t in trials)   # so TPE's joint model keeps every trial
    fixed_names = {p.optuna_name for p in searched_params(spec) if p.name in first["fixed"]}
    relative = study.sampler.infer_relative_search_space(study, trials[-1])
    assert "learning_rate" in relative and not fixed_names & set(relative)
    after = [t for t in trials if REFINEMENT_ATTR in t.user_attrs]
    assert after and min(t.number for t in after) == first["after_trials"]
    refiner = searcher._refiner
    for t in after:
        region_at = {}
        for entry in refinements[:t.user_attrs[REFINEMENT_ATTR] + 1]:
            region_at.update({name: ("fixed", v) for name, v in entry["fixed"].items()})
            region_at.update({name: ("range", v) for name, v in entry["narrowed"].items()})
        for name, (how, value) in region_at.items():
            sampled = t.user_attrs[f"param_{name}"]
            if how == "fixed":
                assert sampled == value
            elif isinstance(value[0], (int, float)) and name != "alpha_ratio":
                assert value[0] <= sampled <= value[1], (t.number, name, sampled, value)
            else:
                assert sampled in value
    assert refiner.index == len(refinements) - 1


def test_resumed_searcher_takes_up_the_region():
    storage = optuna.storages.InMemoryStorage()   # shared by both searchers, as a database would be
    spec = make_spec()
    first = run_searcher(spec, storage, 16)
    region = (dict(first._ot_study.sampler.fixed), dict(first._ot_study.sampler.narrowed))
    assert region != ({}, {})
    again = PeftOptunaSearch(space=spec.search_space(), metric="eval_accuracy", mode="max",
                             sampler=make_sampler("tpe", 1), study_name="refine", storage=storage,
                             decode=spec.decode, refiner=Refiner.from_spec(spec))
    assert (again._ot_study.sampler.fixed, again._ot_study.sampler.narrowed) == region
    run_searcher(spec, storage, 2, searcher=again)
    assert again._ot_study.trials[-1].user_attrs[REFINEMENT_ATTR] == again._refiner.index


def test_same_seed_same_refinements():
    spec = make_spec()
    runs = [run_searcher(spec, optuna.storages.InMemoryStorage(), 16) for _ in (0, 1)]
    assert runs[0]._ot_study.user_attrs[REFINEMENTS_ATTR] == runs[1]._ot_study.user_attrs[REFINEMENTS_ATTR]


def test_refined_random_sampler_stays_in_the_region():
    study = optuna.create_study(sampler=RefinedSampler(make_sampler("random", 0)))
    space = {"x": FloatDistribution(0.0, 10.0), "y": FloatDistribution(0.0, 1.0)}
    study.sampler.set_region({"y": 0.5}, {"x": FloatDistribution(2.0, 3.0)})
    for _ in range(20):
        trial = study.ask(fixed_distributions=space)
        assert 2.0 <= trial.params["x"] <= 3.0 and trial.params["y"] == 0.5
        assert trial.distributions == space
        study.tell(trial, trial.params["x"])


def test_searcher_keeps_diagnostics_and_stopped_early(tmp_path):
    # (the trainer reports these; the searcher must keep them on the Optuna trial for trials.csv)
    spec = make_spec(refine_every=0)
    searcher = PeftOptunaSearch(space=spec.search_space(), metric="eval_accuracy", mode="max",
                                sampler=make_sampler("tpe", 0), study_name="d",
                                storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/d.db"), decode=spec.decode)
    searcher.suggest("a")
    result = {"round": 1, "training_iteration": 1, "eval_accuracy": 0.5, ROUNDS_TOTAL_KEY: 1,
              f"{DIAG_PREFIX}grad_norm_max": 3.5, f"{DIAG_PREFIX}note": "loss plateaued",
              STOPPED_EARLY_KEY: "max_steps", f"{DIAG_PREFIX}bad": object(), "unrelated": 1}
    searcher.on_trial_complete("a", result)
    attrs = searcher._ot_study.get_trials()[0].user_attrs
    assert attrs[f"{DIAG_PREFIX}grad_norm_max"] == 3.5 and attrs[f"{DIAG_PREFIX}note"] == "loss plateaued"
    assert attrs[STOPPED_EARLY_KEY] == "max_steps"
    assert f"{DIAG_PREFIX}bad" not in attrs and "unrelated" not in attrs
    assert "refinement" not in attrs


def test_rows_of_a_refined_study_still_rebuild():
    spec = make_spec()
    searcher = run_searcher(spec, optuna.storages.InMemoryStorage(), 14)
    rows = trial_rows(searcher._ot_study.get_trials(), ["eval_accuracy"])
    assert len(rows) == 14 and all("param_learning_rate" in r for r in rows)


# --- spec keys -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("search, objective, expected", [
    ({"algorithm": "grid", "refine_every": 5}, None, "search.refine_every: refinement works with algorithm tpe"),
    ({"algorithm": "nsga2", "refine_every": 5, "scheduler": "none"}, None, "search.refine_every: refinement works"),
    ({"algorithm": "gp", "refine_every": 5}, None, "search.refine_every: refinement works with algorithm tpe or random "
     "(one objective), not gp; set refine_every: 0 or algorithm: tpe"),
    ({"refine_every": 5, "scheduler": "none"}, {"metric": ["eval_accuracy", "adapter_mb"], "mode": ["max", "min"]},
     "search.refine_every: refinement rates settings on one objective"),
    ({"refine_every": -1}, None, "search.refine_every: must be >= 0, got -1"),
    ({"refine_every": 30}, None, "search.refine_every: must be < search.trials (30)"),
    ({"refine_min_importance": 1.5}, None, "search.refine_min_importance: must be <= 1, got 1.5"),
    ({"refine_min_width": 0}, None, "search.refine_min_width: must be > 0, got 0"),
    ({"refine_evry": 3}, None, "search.refine_evry: unknown key (did you mean 'refine_every'?)"),
])
def test_spec_rejects_bad_refinement_keys(search, objective, expected):
    space = {"r": [2, 4], "learning_rate": [1e-4, 3e-4]} if search.get("algorithm") == "grid" else None
    with pytest.raises(SpecError) as caught:
        make_spec(space=space, objective=objective, **search)
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value.problems


def test_spec_refinement_keys_default_off_and_round_trip():
    spec = make_spec(refine_every=0)
    assert spec.search.refine_every == 0 and Refiner.from_spec(spec) is None
    spec = make_spec(refine_every=4, refine_min_importance=0.2, refine_min_width=0.5)
    assert spec.to_dict()["search"]["refine_every"] == 4
    settings = Refiner.from_spec(spec).settings
    assert (settings.every, settings.min_importance, settings.min_width) == (4, 0.2, 0.5)
