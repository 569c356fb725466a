"""The default sampler (search/run/gp.py): Optuna's GP sampler, which also learns from pruned trials."""
import math

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from search.run.gp import GP_STARTUP_TRIALS, PrunedAwareGPSampler, pruned_as_complete
from search.run.searcher import make_sampler
from search.spec import parse_spec

SPACE = {"x": FloatDistribution(0.0, 1.0), "r": IntDistribution(1, 8)}


def add(study, x, r, state=TrialState.COMPLETE, value=None, reports=()):
    study.add_trial(optuna.trial.create_trial(
        params={"x": x, "r": r}, distributions=SPACE, state=state, value=value,
        intermediate_values=dict(enumerate(reports, start=1))))


def test_pruned_trials_count_at_their_last_report():
    study = optuna.create_study(direction="maximize")
    add(study, 0.5, 2, value=0.8)
    add(study, 0.9, 4, state=TrialState.PRUNED, reports=(0.1, 0.3))
    add(study, 0.1, 4, state=TrialState.PRUNED)                          # stopped before any report
    add(study, 0.2, 4, state=TrialState.PRUNED, reports=(0.2, math.nan))  # diverged
    seen = pruned_as_complete(study, SPACE)
    assert [(t.params, t.value, t.state) for t in seen] == [({"x": 0.9, "r": 4}, 0.3, TrialState.COMPLETE)]
    assert pruned_as_complete(study, {**SPACE, "other": FloatDistribution(0, 1)}) == []  # a setting it lacks


def test_several_objectives_take_no_pruned_trials():
    study = optuna.create_study(directions=["maximize", "minimize"])
    add_values = dict(params={"x": 0.9, "r": 4}, distributions=SPACE, state=TrialState.PRUNED,
                      intermediate_values={1: 0.3})
    study.add_trial(optuna.trial.create_trial(**add_values))
    assert pruned_as_complete(study, SPACE) == []


def test_the_gp_is_fitted_to_complete_and_pruned_trials(monkeypatch):
    fitted = []
    original = optuna.samplers.GPSampler._sample_relative_impl

    def spy(self, study, completed, running, space):
        fitted.append(sorted(t.value for t in completed))
        return original(self, study, completed, running, space)

    monkeypatch.setattr(optuna.samplers.GPSampler, "_sample_relative_impl", spy)
    study = optuna.create_study(direction="maximize", sampler=PrunedAwareGPSampler(seed=0))
    for i in range(GP_STARTUP_TRIALS):
        add(study, 0.1 + 0.1 * i, 2, value=0.5 + 0.01 * i)
    add(study, 0.95, 8, state=TrialState.PRUNED, reports=(0.05,))
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.suggest_int("r", 1, 8)
    assert fitted == [[0.05, 0.5, 0.51, 0.52, 0.53]]


def test_pruned_trials_steer_the_gp_away_from_their_region():
    """A maximum sits at x = 1 on a smooth objective; pruned trials there report a poor value. Told of them,
    the GP's next proposals stay away from x = 1 more than when it is blind to them."""
    def proposals(sampler_class):
        study = optuna.create_study(direction="maximize", sampler=sampler_class(seed=3))
        for x in (0.05, 0.2, 0.35, 0.5):
            add(study, x, 4, value=x)                   # rising toward x = 1
        for x in (0.85, 0.9, 0.95, 1.0):
            add(study, x, 4, state=TrialState.PRUNED, reports=(0.0,))
        xs = []
        for _ in range(3):
            trial = study.ask()
            xs.append(trial.suggest_float("x", 0.0, 1.0))
            trial.suggest_int("r", 1, 8)
            study.tell(trial, state=TrialState.FAIL)   # no new evidence: the same model each time
        return xs

    class Blind(optuna.samplers.GPSampler):
        def __init__(self, seed):
            super().__init__(seed=seed, n_startup_trials=GP_STARTUP_TRIALS, warn_independent_sampling=False)

    told, blind = proposals(PrunedAwareGPSampler), proposals(Blind)
    assert max(told) + 0.2 < min(blind), (told, blind)


def test_concurrent_trials_get_different_proposals():
    """With trials still running (concurrency > 1) the GP proposes a batch (qLogEI), not one point twice."""
    study = optuna.create_study(direction="maximize", sampler=make_sampler("gp", 0))
    for i, x in enumerate((0.1, 0.4, 0.6, 0.9, 0.7)):
        add(study, x, 1 + i, value=1 - abs(x - 0.65))
    running = []
    for _ in range(3):
        trial = study.ask()
        running.append((round(trial.suggest_float("x", 0.0, 1.0), 6), trial.suggest_int("r", 1, 8)))
    assert len(set(running)) == 3, running


def test_several_objectives_are_modelled():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("gp", 0))
    for i, x in enumerate((0.1, 0.4, 0.6, 0.9, 0.7)):
        study.add_trial(optuna.trial.create_trial(params={"x": x, "r": 1 + i}, distributions=SPACE,
                                                  values=[x, float(1 + i)]))
    trial = study.ask()
    assert trial.relative_params.keys() == {"x", "r"}   # the GP's proposal, not the random fallback


@pytest.mark.parametrize("search, algorithm", [({}, "gp"), ({"algorithm": "tpe"}, "tpe")])
def test_gp_is_the_default_algorithm(search, algorithm):
    raw = {"name": "gp", "model": {"name_or_path": "minilm"}, "data": {"train": "train.jsonl", "label_field": "label"},
           "peft": {"method": "lora"}, "space": {"r": [4, 8]}, "search": search, "tracking": {"wandb": "disabled"}}
    spec = parse_spec(raw, check_files=False, check_model=False)
    assert spec.search.algorithm == algorithm
    assert isinstance(make_sampler(spec.search.algorithm, 0), PrunedAwareGPSampler) == (algorithm == "gp")
