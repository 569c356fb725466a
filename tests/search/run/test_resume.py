"""Resume's bookkeeping without Ray: the plan, the fingerprint, the driver lock, interrupted trials handed
out again, and a resumed search that keeps TPE's model (search/run/resume.py, search/run/searcher.py)."""
import os
import signal
import subprocess
import sys
import textwrap

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search.run.resume import DriverLock, ResumeError, plan, record_or_check
from search.run.searcher import TRIAL_NUMBER_KEY, PeftOptunaSearch, make_sampler
from search.spec.search_spec import parse_spec
from search.store.rundir import RunDirError

SPACE = {"x": FloatDistribution(0.0, 1.0)}


def _spec(space=None, metric="eval_accuracy", mode="max"):
    return parse_spec({
        "name": "resumed", "model": {"name_or_path": "minilm", "task": "sequence-classification"},
        "data": {"train": "train.jsonl", "label_field": "label"}, "peft": {"method": "lora"},
        "space": space or {"r": [4, 8], "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}},
        "objective": {"metric": metric, "mode": mode},
    }, base_dir=".", check_files=False, check_model=False)


def _study(tmp_path, name="s"):
    return optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name=name, direction="maximize",
                               load_if_exists=True)


def test_the_plan_keeps_finished_trials_and_runs_interrupted_ones_again(tmp_path):
    study = _study(tmp_path)
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING):
        trial = study.ask()
        if state != TrialState.RUNNING:
            study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
    todo = plan(study, total=8)
    assert (todo.finished, todo.interrupted, todo.new, todo.to_run, todo.asked) == (3, [3, 4], 3, 5, 5)
    assert plan(study, total=4).new == 0   # never more trials than the spec asks for


def test_a_changed_space_or_objective_is_refused_with_what_changed(tmp_path):
    study = _study(tmp_path)
    record_or_check(study, _spec())
    record_or_check(study, _spec())   # the same spec resumes
    with pytest.raises(ResumeError, match=r"space: .*added lora_dropout.*start a new search"):
        record_or_check(study, _spec(space={"r": [4, 8], "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                            "lora_dropout": {"low": 0.0, "high": 0.1}}))
    with pytest.raises(ResumeError, match=r"space: .*r_log2 changed|space: .*r changed"):
        record_or_check(study, _spec(space={"r": [4, 16], "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}))
    with pytest.raises(ResumeError, match=r"objective: .*eval_loss"):
        record_or_check(study, _spec(metric="eval_loss", mode="min"))


def test_the_driver_lock_admits_one_driver_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from search.run.resume import DriverLock
        with DriverLock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"a search is running there now \\(pid {holder.pid}\\)"):
            with DriverLock(str(tmp_path)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with DriverLock(str(tmp_path)):   # SIGKILL left no stale lock
        pass


def _searcher(tmp_path, resume=()):
    return PeftOptunaSearch(space=SPACE, metric="eval_accuracy", mode="max", sampler=make_sampler("tpe", 0),
                            study_name="s", storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db"),
                            decode=dict, resume=resume)


def _result(round_, value, total=1):
    return {"round": round_, "training_iteration": round_, "eval_accuracy": value, "rounds_total": total}


def test_an_interrupted_trial_is_handed_out_again_before_new_ones(tmp_path):
    first = _searcher(tmp_path)
    first.suggest("a")
    first.on_trial_complete("a", _result(1, 0.5))
    interrupted = first.suggest("b")      # the driver dies here: trial 1 stays RUNNING
    resumed = _searcher(tmp_path, resume=[1])
    again = resumed.suggest("c")
    assert again == interrupted and again[TRIAL_NUMBER_KEY] == 1
    assert resumed.suggest("d")[TRIAL_NUMBER_KEY] == 2
    # it had reported round 1 of 2 before; resumed, it reports round 2 at its own round
    resumed.on_trial_result("c", _result(2, 0.7, total=2))
    resumed.on_trial_complete("c", _result(2, 0.7, total=2))
    trial = resumed._ot_study.get_trials()[1]
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.7)
    assert trial.intermediate_values == {2: pytest.approx(0.7)}


def test_a_resumed_search_keeps_tpe_model_of_the_earlier_trials(tmp_path):
    """12 earlier trials say x near 0.9 is best; the resumed search's next proposals go there (random
    proposals would average 0.5)."""
    study = _study(tmp_path)
    for index in range(12):
        x = index / 11
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=SPACE, value=-(x - 0.9) ** 2))
    resumed = _searcher(tmp_path)
    proposals = []
    for index in range(6):
        config = resumed.suggest(f"t{index}")
        proposals.append(config["x"])
        resumed.on_trial_complete(f"t{index}", _result(1, -(config["x"] - 0.9) ** 2))
    assert sum(proposals) / len(proposals) > 0.7, proposals
