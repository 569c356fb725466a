"""trials.csv and report.md built from a stored study fed made-up trials (no training)."""
import csv

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search.report import build_report
from search.results import best_row, trial_rows, write_trials_csv

DIST = {"learning_rate": FloatDistribution(1e-5, 1e-2, log=True)}


def made_up_trials():
    def trial(state, value, lr, **attrs):
        return create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                            params={"learning_rate": lr}, distributions=DIST,
                            user_attrs={"param_learning_rate": lr, **attrs})
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(TrialState.COMPLETE, 0.7, 1e-4, tokens_per_s=10.0, eval_loss=0.6))
    study.add_trial(trial(TrialState.PRUNED, None, 1e-3, eval_accuracy=0.3,
                          fail_reason="stopped by the scheduler after round 1"))
    study.add_trial(trial(TrialState.FAIL, None, 5e-3, fail_reason="diverged at step 3 (loss=nan)"))
    study.add_trial(trial(TrialState.COMPLETE, 0.9, 2e-4, tokens_per_s=12.0, eval_loss=0.4))
    study.add_trial(trial(TrialState.COMPLETE, 0.9, 3e-4, tokens_per_s=11.0, eval_loss=0.5))
    return study.get_trials()


def test_rows_keep_every_state_and_reason(tmp_path):
    rows = trial_rows(made_up_trials(), ["eval_accuracy"])
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE", "COMPLETE"]
    assert rows[1]["eval_accuracy"] == 0.3  # a pruned trial shows its last value
    assert rows[2]["fail_reason"] == "diverged at step 3 (loss=nan)"
    path = tmp_path / "trials.csv"
    write_trials_csv(rows, str(path))
    back = list(csv.DictReader(open(path)))
    assert len(back) == 5 and back[2]["eval_accuracy"] == "" and back[0]["param_learning_rate"] == "0.0001"


def test_best_is_the_best_complete_trial_and_ties_go_to_the_earlier_one():
    rows = trial_rows(made_up_trials(), ["eval_accuracy"])
    assert best_row(rows, "eval_accuracy", "max")["number"] == 3
    assert best_row(rows, "eval_loss", "min")["number"] == 3
    assert best_row([r for r in rows if r["state"] != "COMPLETE"], "eval_accuracy", "max") is None


def test_report_has_best_baseline_and_failures():
    rows = trial_rows(made_up_trials(), ["eval_accuracy"])
    summary = {"name": "t", "model": "minilm", "task": "sequence-classification", "method": "lora",
               "metric": "eval_accuracy", "mode": "max", "algorithm": "tpe", "scheduler": "asha", "trials": 6}
    baseline = {"majority_label": "files", "eval_accuracy": 0.2, "eval_rows": 100}
    text = build_report("/runs/t", summary, rows, best_row(rows, "eval_accuracy", "max"), baseline, wall_s=42)
    assert "Trials: 5 of 6 (3 complete, 1 pruned, 1 fail)" in text
    assert "majority class (always predicts `files`) | 0.2 |" in text
    assert "Trial 3: **eval_accuracy = 0.9**" in text
    assert "- trial 2: diverged at step 3 (loss=nan)" in text


def test_sensitivity_section_needs_enough_complete_trials_and_then_rates_settings():
    import random

    from search.report import MIN_TRIALS_FOR_SENSITIVITY, sensitivity_section

    rng = random.Random(0)
    rows = []
    for number in range(30):
        lr, dropout = 10 ** rng.uniform(-4, -2), rng.uniform(0, 0.2)
        accuracy = 0.5 + (0.3 if 1e-3 <= lr <= 4e-3 else 0.0) + rng.uniform(-0.01, 0.01)
        rows.append({"number": number, "state": "COMPLETE", "param_learning_rate": lr,
                     "param_lora_dropout": dropout, "eval_accuracy": accuracy})
    few = sensitivity_section(rows[:MIN_TRIALS_FOR_SENSITIVITY - 1], "eval_accuracy", "max", None)
    assert any("Needs at least" in line for line in few)
    text = "\n".join(sensitivity_section(rows, "eval_accuracy", "max", {"fanova": {"learning_rate": 0.9}}))
    lr_line = next(line for line in text.splitlines() if line.startswith("| learning_rate"))
    dropout_line = next(line for line in text.splitlines() if line.startswith("| lora_dropout"))
    assert "HIGH" in lr_line and "LOW" in dropout_line
    assert "fanova importance: learning_rate 0.90" in text
