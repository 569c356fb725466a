"""The trials table, rebuilt from the Optuna storage (the one source of truth).

Reading from storage rather than from the driver's memory means `peft-search report` works while a
search runs and after its driver died, and that nothing a finished trial measured is lost.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.storage import STUDY_NAME

SYSTEM_COLUMNS = ["tokens_per_s", "peak_mem_mb", "adapter_mb", "train_s", "energy_j"]
STATE_NAMES = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAIL",
               TrialState.RUNNING: "RUNNING", TrialState.WAITING: "WAITING"}


def load_study(storage) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=storage)


def trial_rows(trials: Sequence[FrozenTrial], objective_names: Sequence[str]) -> List[Dict[str, object]]:
    """One dict per trial with the INTERFACE.md trials.csv columns (plus rounds and duration)."""
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        attrs = trial.user_attrs
        row: Dict[str, object] = {"number": trial.number, "state": STATE_NAMES.get(trial.state, trial.state.name)}
        row.update({k: v for k, v in sorted(attrs.items()) if k.startswith("param_")})
        values = trial.values if trial.state == TrialState.COMPLETE else None
        for i, name in enumerate(objective_names):
            # a pruned trial's objective is its last reported value: useful, but marked by its state
            row[name] = values[i] if values else attrs.get(name)
        row.update({k: v for k, v in sorted(attrs.items()) if k.startswith("eval_") and k not in row})
        row["train_loss"] = attrs.get("train_loss")
        row["rounds"] = attrs.get("round")
        for column in SYSTEM_COLUMNS:
            row[column] = attrs.get(column)
        row["duration_s"] = round(trial.duration.total_seconds(), 1) if trial.duration else None
        row["fail_reason"] = attrs.get("fail_reason", "")
        rows.append(row)
    return rows


def columns(rows: List[Dict[str, object]]) -> List[str]:
    """Every key of the rows, in first-seen order (rows of different trials have different params)."""
    seen: List[str] = []
    for row in rows:
        seen.extend(k for k in row if k not in seen)
    return seen


def write_trials_csv(rows: List[Dict[str, object]], path: str) -> None:
    names = columns(rows)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names or ["number", "state"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in names})
    os.replace(tmp, path)  # a reader never sees half a file


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def best_row(rows: List[Dict[str, object]], metric: str, mode: str) -> Optional[Dict[str, object]]:
    complete = [r for r in rows if r["state"] == "COMPLETE" and isinstance(r.get(metric), (int, float))]
    if not complete:
        return None
    # ties go to the earlier trial, so the choice is stable
    if mode == "max":
        return max(complete, key=lambda r: (r[metric], -r["number"]))
    return min(complete, key=lambda r: (r[metric], r["number"]))
