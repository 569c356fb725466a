"""Chaos: the driver and trial workers are killed (SIGKILL) at random points of a real search, which
is then resumed; nothing finished is lost or rerun and every trial ends accounted for.

Each test is one search of TRIALS short trials (tiny BERT, 3 eval rounds, concurrency 2). Kill points
are drawn from a seeded RNG: a moment after some trial has checkpointed a round, after some trial has
finished, or a number of seconds into a driver's life. More runs: PEFT_SEARCH_CHAOS_RUNS=N (each run
draws new kill points; the counts are printed), more driver kills a run: PEFT_SEARCH_CHAOS_KILLS=K (each
driver start costs the suite about a minute, so CI kills one driver a run), e.g. for the issue note:
    PEFT_SEARCH_CHAOS_RUNS=4 PEFT_SEARCH_CHAOS_KILLS=2 python -m pytest -q -s tests/chaos
"""
import csv
import os
import random
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cluster.leftovers import processes_of, recorded_port
from trainers.tiny_models import build_tiny_classifier, make_learnable_classification_data

pytestmark = pytest.mark.slow

TRIALS = 5
RUNS = int(os.environ.get("PEFT_SEARCH_CHAOS_RUNS", "1"))
DRIVER_KILLS = int(os.environ.get("PEFT_SEARCH_CHAOS_KILLS", "1"))   # per run
FINAL = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos-inputs")
    model = build_tiny_classifier(str(root / "tiny-bert"), num_labels=2)
    train = make_learnable_classification_data(str(root / "train.jsonl"), 96, seed=1)
    return model, train


def _write_spec(directory, model, train, name):
    spec = {
        "name": name,
        "model": {"name_or_path": model, "task": "sequence-classification"},
        "data": {"train": train, "text_field": "text", "label_field": "label", "max_length": 32},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        "space": {"r": [2, 4, 8], "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}},
        "training": {"epochs": 3, "batch_size": 16},
        "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"algorithm": "tpe", "trials": TRIALS, "concurrency": 2, "scheduler": "none", "seed": 5,
                   "max_failures": 2},
        "resources": {"workers_per_trial": 1},
        "tracking": {"wandb": "disabled"},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _start(args, log_path):
    log = open(log_path, "a")
    return subprocess.Popen([sys.executable, "-m", "search", *args], stdout=log, stderr=subprocess.STDOUT)


def _study(run_dir):
    path = run_dir / "study.sqlite3"
    if not path.exists():
        return None
    try:
        return optuna.load_study(study_name="peft-search", storage=f"sqlite:///{path}")
    except Exception:   # not created yet
        return None


def _finished(run_dir):
    """number -> (state, value, end time) of the trials the storage holds as finished."""
    study = _study(run_dir)
    trials = study.get_trials(deepcopy=False) if study else []
    return {t.number: (t.state, t.value, t.datetime_complete) for t in trials if t.state in FINAL}


def _checkpointed_rounds(run_dir):
    """trial number -> its newest checkpointed round."""
    rounds = {}
    for latest in (run_dir / "trials").glob("*/checkpoint/latest"):
        try:
            rounds[int(latest.parent.parent.name)] = int(latest.read_text().strip().split("-")[-1])
        except ValueError:
            continue   # being written
    return rounds


def _wait_for(condition, process, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False   # it ended before the kill point: nothing to kill
        if condition():
            return True
        time.sleep(0.5)
    raise AssertionError("the kill point never came")


def _kill_point(rng, run_dir, started):
    kind = rng.choice(["checkpoint", "finished", "seconds"])
    if kind == "checkpoint":
        return kind, lambda: bool(_checkpointed_rounds(run_dir))
    if kind == "finished":
        before = len(_finished(run_dir))
        return kind, lambda: len(_finished(run_dir)) > before
    delay = rng.uniform(5, 40)
    return f"{delay:.0f}s", lambda: time.time() - started > delay


def _assert_all_accounted_for(run_dir, kept):
    study = _study(run_dir)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(TRIALS))
    assert all(t.state in FINAL for t in trials), [(t.number, t.state) for t in trials]
    with open(run_dir / "trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["number"]) for r in rows] == list(range(TRIALS))
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED", "FAIL"}
    finished = _finished(run_dir)
    for number, before in kept.items():   # finished before a kill: kept as they were, never rerun
        assert finished[number] == before, (number, before, finished[number])


@pytest.mark.parametrize("run", range(RUNS))
def test_driver_killed_at_random_points_then_resumed(tmp_path, inputs, run):
    rng = random.Random(1000 + run)
    spec = _write_spec(tmp_path, *inputs, name=f"driver{run}")
    run_dir, log = tmp_path / "runs" / f"driver{run}", tmp_path / "driver.log"
    process, kills, kept, resumed_from = _start(["run", str(spec), "--runs-dir", str(tmp_path / "runs")], log), [], {}, {}
    for _ in range(DRIVER_KILLS):
        point, condition = _kill_point(rng, run_dir, time.time())
        if not _wait_for(condition, process):
            break
        checkpointed = _checkpointed_rounds(run_dir)
        process.send_signal(signal.SIGKILL)
        process.wait()
        # read after the kill: a trial that finished between the checkpoint read and the kill is kept, not
        # interrupted (seen in CI: such a trial "resumed" from nothing failed the check below)
        kept.update(_finished(run_dir))
        kills.append(point)
        # interrupted trials with a checkpoint must go on from it (or from a later one)
        resumed_from.update({n: r for n, r in checkpointed.items() if n not in kept and r < 3})
        process = _start(["resume", str(run_dir)], log)
    assert process.wait(timeout=900) == 0, log.read_text()[-4000:]
    print(f"\nchaos run {run}: driver killed at {kills}; {len(kept)} trials finished before a kill, "
          f"{len(resumed_from)} interrupted after a checkpoint")
    _assert_all_accounted_for(run_dir, kept)
    trials = _study(run_dir).get_trials(deepcopy=False)
    for number, round_ in resumed_from.items():
        trial = trials[number]
        if trial.state == TrialState.COMPLETE and trial.user_attrs.get("round", 0) > round_:
            assert trial.user_attrs.get("resumed_after_round", 0) >= round_, (number, trial.user_attrs)
    # the last driver stopped its own Ray; the killed drivers' leftovers were stopped by the resumes
    assert recorded_port(run_dir) is None


def test_a_killed_trial_worker_retries_from_its_checkpoint(tmp_path, inputs):
    # ten times the rows: a trial of the 96-row data took about a second, and its window between a checkpoint
    # and its end was sometimes over before a look saw it (seen in CI: the search ended with no kill)
    train = make_learnable_classification_data(str(tmp_path / "train.jsonl"), 960, seed=1)
    spec = _write_spec(tmp_path, inputs[0], train, name="worker")
    run_dir, log = tmp_path / "runs" / "worker", tmp_path / "worker.log"
    process = _start(["run", str(spec), "--runs-dir", str(tmp_path / "runs")], log)
    killed = []

    def a_worker_mid_trial():
        port = recorded_port(run_dir)
        checkpointed = _checkpointed_rounds(run_dir)
        if port is None or not set(checkpointed) - set(_finished(run_dir)):
            return False
        # every group's workers: a group between trials has none to retry (seen in CI: the one killed was idle)
        killed.extend(processes_of(port, name="ray::RayTrainWorker"))
        return bool(killed)

    assert _wait_for(a_worker_mid_trial, process)
    checkpointed, finished = _checkpointed_rounds(run_dir), _finished(run_dir)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    assert process.wait(timeout=900) == 0, log.read_text()[-4000:]
    _assert_all_accounted_for(run_dir, {})
    text = log.read_text()
    retried = {int(n) for n in re.findall(r"trial (\d+): .*; retrying from its last checkpoint", text)}
    assert retried, text[-4000:]
    trials = _study(run_dir).get_trials(deepcopy=False)
    # the trial the killed worker ran went on from the round it had checkpointed (if it had one by then)
    for number in retried:
        if number in checkpointed and number not in finished and checkpointed[number] < 3:
            assert trials[number].user_attrs.get("resumed_after_round", 0) >= checkpointed[number], \
                (number, checkpointed, trials[number].user_attrs)
