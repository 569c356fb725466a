"""Contract tests for every plug-in registry, parametrised over every registered entry (the shape of Syne Tune's
`test_schedulers_api.py`): a scheduler, sampler, tracker or PEFT method added to its registry is held to the same
contract as the others without a test of its own.
"""
from __future__ import annotations

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.run.schedulers import SCHEDULERS, make_scheduler
from search.run.searcher import SAMPLERS, make_sampler
from search.run.tracking import STATES, TRACKERS
from spaces.methods import get_method, method_names
from trainers.adapters import BUILDERS, DEFAULTS, build_peft_config, prefix_tuning_problem
from trainers.settings import PeftSettings
from trainers.tiny_models import build_tiny_causal_lm, build_tiny_classifier

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------- schedulers

@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("mode", ["min", "max"])
def test_scheduler_contract(name, mode):
    """Made-up results, as Ray's own scheduler tests feed them: the decisions are ones a worker group can carry
    out (continue or stop, never pause), the best trial of every round goes on until the last round, and a
    failed trial's report (its reason, no metric) is taken without a decision against it."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    rounds = 4
    scheduler = make_scheduler(name, "eval_loss", mode, max_rounds=rounds, grace_rounds=1, reduction_factor=2)
    trials = [Trial("__fake", config={}, stub=True) for _ in range(4)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    best = 0 if mode == "min" else len(trials) - 1   # loss grows with the index
    running = set(range(len(trials)))
    for number in range(1, rounds + 1):
        for index in sorted(running):
            decision = scheduler.on_trial_result(None, trials[index], {"round": number, "training_iteration": number,
                                                                        "eval_loss": 1.0 + index})
            assert decision in (TrialScheduler.CONTINUE, TrialScheduler.STOP), decision
            if index == best and number < rounds:
                assert decision == TrialScheduler.CONTINUE, f"{name} stopped the best trial at round {number}"
            if decision == TrialScheduler.STOP:
                running.discard(index)
                scheduler.on_trial_complete(None, trials[index], {"round": number, "eval_loss": 1.0 + index})
    failed = Trial("__fake", config={}, stub=True)
    scheduler.on_trial_add(None, failed)
    assert scheduler.on_trial_result(None, failed, {"fail_reason": "diverged", "training_iteration": 1}) == \
        TrialScheduler.CONTINUE


# --------------------------------------------------------------------------- samplers

SPACE = {"learning_rate": FloatDistribution(1e-5, 1e-2, log=True), "r_log2": IntDistribution(0, 4),
         "alpha_ratio": CategoricalDistribution([1, 2])}
GRID = {"learning_rate": [1e-4, 1e-3], "r_log2": [0, 4], "alpha_ratio": [1, 2]}


def _sampled(name: str, seed: int, trials: int = 6):
    study = optuna.create_study(sampler=make_sampler(name, seed, grid=GRID), direction="minimize")
    for _ in range(trials):
        trial = study.ask(SPACE)
        study.tell(trial, trial.params["learning_rate"] * 100 + trial.params["r_log2"])
    return [trial.params for trial in study.trials]


@pytest.mark.parametrize("name", sorted([*SAMPLERS, "grid"]))
def test_sampler_contract(name):
    """Every sample lies in its distribution, the same seed draws the same trials (a search is repeatable), and
    another seed draws others."""
    first = _sampled(name, seed=3)
    for params in first:
        for key, distribution in SPACE.items():
            assert distribution._contains(distribution.to_internal_repr(params[key])), (key, params[key])
    assert _sampled(name, seed=3) == first
    assert _sampled(name, seed=4) != first


# --------------------------------------------------------------------------- trackers

@pytest.mark.parametrize("name", sorted(TRACKERS))
@pytest.mark.parametrize("state", STATES)
def test_tracker_contract(name, state, tmp_path, monkeypatch):
    """A trial tracker takes every round's metrics and ends in each state without raising (tracking must never
    fail a trial); the tables logger takes the search's tables."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    factory, tables_logger = TRACKERS[name]
    tracking = {"wandb": "offline" if name == "wandb" else "disabled", "project": "contract"}
    tracker = factory(str(tmp_path), "contract", 7, {"r": 8, "learning_rate": 1e-4}, tracking)
    for number in (1, 2):
        tracker.log_round({"round": number, "eval_loss": 1.0 / number, "tokens_per_s": 10.0})
    tracker.finish({"eval_loss": 0.5}, state)
    tables_logger(str(tmp_path), "contract", tracking, {"trials": [{"number": 7, "state": state, "eval_loss": 0.5}]})


# --------------------------------------------------------------------------- PEFT methods

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract_models")
    return {"sequence-classification": build_tiny_classifier(str(root / "bert"), num_labels=2, seed=0),
            "causal-lm": build_tiny_causal_lm(str(root / "llama"), arch="llama", seed=0)}


def test_every_searchable_method_has_a_trainer():
    """What spaces/ offers to search, trainers/ can build: one registry does not run ahead of the other."""
    assert set(method_names()) == set(BUILDERS) == set(DEFAULTS)
    for name in method_names():
        derived = {target for target, _other in get_method(name).ratios.values()}
        assert set(get_method(name).params) - derived <= set(DEFAULTS[name]), name


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
@pytest.mark.parametrize("name", method_names())
def test_peft_method_contract(name, task, tiny_models):
    """With its defaults, every method wraps both tasks' tiny models in an adapter whose trained parameters all
    get gradients from one step, and the base's own weights stay frozen; or it is refused with its reason."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_models[task]
    auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
    model = auto.from_pretrained(path)
    if name == "prefix-tuning" and prefix_tuning_problem(model, task):
        with pytest.raises(ValueError, match="past_key_values"):
            build_peft_config(PeftSettings(name), model, task)
        return
    params = {"num_virtual_tokens": 4} if "num_virtual_tokens" in DEFAULTS[name] else {}
    peft_model = get_peft_model(model, build_peft_config(PeftSettings(name, params), model, task, tokenizer_path=path))
    trained = {key: param for key, param in peft_model.named_parameters() if param.requires_grad}
    assert trained
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["one two three", "four five"], padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)
    labels = torch.tensor([0, 1]) if task == "sequence-classification" else batch["input_ids"]
    peft_model(**batch, labels=labels).loss.backward()
    assert all(param.grad is not None for param in trained.values()), \
        [key for key, param in trained.items() if param.grad is None]
    frozen = [key for key, param in peft_model.named_parameters() if not param.requires_grad]
    assert frozen and all(peft_model.get_parameter(key).grad is None for key in frozen)
