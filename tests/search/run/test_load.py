"""The load test (benchmarks/load_test.py) at CI size: 12 short trials at concurrency 8 through the real stack
(Ray Tune, Optuna, ASHA, one Ray Train worker group per trial), every trial accounted for in trials.csv and in
the Optuna storage (marked `load`: left out of the default run, `pytest -m load` runs it). The benchmark itself
runs 200 trials and bounds the driver's memory growth; this test checks the accounting, not timing or memory.
Plus the accounting check itself, fed broken run directories."""
import csv
import os

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from benchmarks.load_test import FINISHED_STATES, check_accounting, slope_kib_per_trial
from search.store.storage import STUDY_NAME, open_storage


def _run_dir(tmp_path, states, csv_numbers):
    """A run directory whose study holds trials in `states` and whose trials.csv lists `csv_numbers`."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    study = optuna.create_study(storage=open_storage("sqlite", str(run_dir)), study_name=STUDY_NAME)
    dist = {"r": CategoricalDistribution([2, 4])}
    for state in states:
        study.add_trial(create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                                     params={"r": 2}, distributions=dist))
    by_number = {t.number: t.state.name for t in study.get_trials()}
    with open(run_dir / "trials.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state"])
        writer.writerows([n, by_number.get(n, "COMPLETE")] for n in csv_numbers)
    return str(run_dir)


def test_the_accounting_check_passes_a_whole_search(tmp_path):
    run_dir = _run_dir(tmp_path, [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL], [0, 1, 2])
    assert check_accounting(run_dir, 3) == ([], {"COMPLETE": 1, "FAIL": 1, "PRUNED": 1})


def test_the_accounting_check_names_missing_duplicated_and_unfinished_trials(tmp_path):
    run_dir = _run_dir(tmp_path, [TrialState.COMPLETE, TrialState.RUNNING], [0, 0])
    problems, states = check_accounting(run_dir, 3)
    assert states == {"COMPLETE": 1, "RUNNING": 1}
    assert "trials.csv: 2 trials, expected 3" in problems
    assert "trials.csv: numbers are not 0..2: missing [1, 2], twice [0]" in problems
    assert "study: 2 trials, expected 3" in problems
    assert "study: trials not finished: {1: 'RUNNING'}" in problems


def test_growth_is_the_least_squares_slope_per_trial():
    samples = [{"finished": n, "rss_kib": 1000.0 + 3 * n + (1 if n % 2 else -1)} for n in range(10, 20)]
    assert slope_kib_per_trial(samples) == pytest.approx(3.0, abs=0.3)
    assert slope_kib_per_trial(samples[:1]) is None


@pytest.mark.slow
@pytest.mark.load   # minutes on a small machine: `pytest -m load` runs it
def test_every_trial_of_a_concurrent_search_is_accounted_for(tmp_path):
    from benchmarks.load_test import run_load_test

    trials = 12   # two waves at concurrency 8: trials start while others finish
    figures = run_load_test(trials, 8, str(tmp_path))
    assert figures["problems"] == []
    assert sum(figures["states"].values()) == trials and set(figures["states"]) <= set(FINISHED_STATES)
    with open(os.path.join(figures["run_dir"], "trials.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(row["number"]) for row in rows) == list(range(trials))
    # the sampler saw trials finish (so the benchmark's memory figures have data behind them)
    assert figures["samples"] >= 2 and figures["rss_end_mib"] > 0
