"""The searcher's bookkeeping, fed made-up trial results (no training, no Ray cluster)."""
import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from search.run.searcher import FAIL_REASON_KEY, ROUNDS_TOTAL_KEY, TRIAL_NUMBER_KEY, PeftOptunaSearch, make_sampler


@pytest.fixture
def searcher(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db")
    space = {"r_log2": IntDistribution(0, 4), "learning_rate": FloatDistribution(1e-5, 1e-2, log=True)}
    s = PeftOptunaSearch(space=space, metric="eval_accuracy", mode="max", sampler=make_sampler("tpe", 0),
                         study_name="t", storage=storage, decode=lambda p: {"r": 2 ** p["r_log2"],
                                                                             "learning_rate": p["learning_rate"]})
    return s


def result(round_, acc, total=3, **extra):
    return {"round": round_, "training_iteration": round_, "eval_accuracy": acc, "eval_loss": 1.0 - acc,
            ROUNDS_TOTAL_KEY: total, "tokens_per_s": 100.0, **extra}


def test_suggest_passes_trial_number_and_decoded_params(searcher):
    config = searcher.suggest("a")
    trial = searcher._ot_study.get_trials()[0]
    assert config[TRIAL_NUMBER_KEY] == trial.number == 0
    assert trial.user_attrs["param_r"] == 2 ** config["r_log2"]


def test_completed_trial_keeps_value_and_metrics(searcher):
    searcher.suggest("a")
    for k in (1, 2, 3):
        searcher.on_trial_result("a", result(k, 0.5 + k / 10))
    searcher.on_trial_complete("a", result(3, 0.8))
    trial = searcher._ot_study.get_trials()[0]
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(0.8)
    assert trial.user_attrs["tokens_per_s"] == 100.0 and trial.user_attrs["eval_loss"] == pytest.approx(0.2)
    assert trial.intermediate_values == {1: pytest.approx(0.6), 2: pytest.approx(0.7), 3: pytest.approx(0.8)}


def test_trial_stopped_before_its_last_round_is_pruned(searcher):
    searcher.suggest("a")
    searcher.on_trial_result("a", result(1, 0.3))
    searcher.on_trial_complete("a", result(1, 0.3))
    trial = searcher._ot_study.get_trials()[0]
    assert trial.state == TrialState.PRUNED
    assert "round 1" in trial.user_attrs[FAIL_REASON_KEY]


def test_errored_trial_fails_with_its_reason_even_after_reporting(searcher):
    searcher.suggest("a")
    searcher.on_trial_result("a", result(1, 0.4))
    searcher.on_trial_result("a", {FAIL_REASON_KEY: "diverged at step 7 (loss=nan)", "training_iteration": 2})
    searcher.on_trial_complete("a", error=True)
    trial = searcher._ot_study.get_trials()[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[FAIL_REASON_KEY] == "diverged at step 7 (loss=nan)"


def test_failed_trial_without_reason_gets_a_generic_one(searcher):
    searcher.suggest("a")
    searcher.on_trial_complete("a", error=True)
    trial = searcher._ot_study.get_trials()[0]
    assert trial.state == TrialState.FAIL and "failed" in trial.user_attrs[FAIL_REASON_KEY]


def test_nan_metric_is_a_failure_not_a_best_trial(searcher):
    searcher.suggest("a")
    searcher.on_trial_complete("a", result(3, float("nan")))
    assert searcher._ot_study.get_trials()[0].state == TrialState.FAIL


def test_a_used_up_grid_is_told_without_stopping_a_study_that_is_not_optimizing():
    """Optuna's GridSampler calls Study.stop when its grid is used up, which raises outside Study.optimize
    (the searcher tells trials from Tune's callbacks): the last trials of a full grid crashed the driver."""
    import optuna

    from search.run.searcher import make_sampler

    grid = {"r": [2, 4], "learning_rate": [1e-3, 1e-2]}
    plain = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    trials = [plain.ask({"r": optuna.distributions.CategoricalDistribution([2, 4]),
                         "learning_rate": optuna.distributions.CategoricalDistribution([1e-3, 1e-2])})
              for _ in range(4)]
    with pytest.raises(RuntimeError, match="Study.stop"):
        for trial in trials:
            plain.tell(trial, 1.0)
    ours = optuna.create_study(sampler=make_sampler("grid", 0, grid=grid))
    trials = [ours.ask({"r": optuna.distributions.CategoricalDistribution([2, 4]),
                        "learning_rate": optuna.distributions.CategoricalDistribution([1e-3, 1e-2])})
              for _ in range(4)]
    for trial in trials:
        ours.tell(trial, 1.0)
    assert {(t.params["r"], t.params["learning_rate"]) for t in ours.trials} == {(r, lr) for r in (2, 4)
                                                                                  for lr in (1e-3, 1e-2)}
