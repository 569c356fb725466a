"""The trials table, rebuilt from the Optuna storage (the one source of truth), and what is read off it:
the best trial, the Pareto front of several objectives, the per-rank figures.

Reading from storage rather than from the driver's memory means `peft-search report` works while a
search runs and after its driver died, and that nothing a finished trial measured is lost.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.numbers import is_number
from search.store.keys import DIAG_PREFIX, STOPPED_EARLY_KEY
from search.store.storage import STUDY_NAME

# generate_s: seconds the last round spent generating answers (generation-based evaluation; empty without it)
SYSTEM_COLUMNS = ["tokens_per_s", "peak_mem_mb", "adapter_mb", "train_s", "energy_j", "generate_s"]
STATE_NAMES = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAIL",
               TrialState.RUNNING: "RUNNING", TrialState.WAITING: "WAITING"}

Objective = Tuple[str, str]  # (metric, mode)


def load_study(storage, name: str = STUDY_NAME) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def objectives(summary: Dict[str, object]) -> List[Objective]:
    """[(metric, mode)] from search.json, whose "metric"/"mode" are a string or, for several objectives, lists."""
    metric, mode = summary["metric"], summary["mode"]
    metrics = [metric] if isinstance(metric, str) else list(metric)
    modes = [mode] * len(metrics) if isinstance(mode, str) else list(mode)
    if not metrics or len(modes) != len(metrics):
        raise ValueError(f"search.json: metric {metric!r} and mode {mode!r} must name one mode per metric")
    return list(zip(metrics, modes))


def trial_rows(trials: Sequence[FrozenTrial], objective_names: Sequence[str]) -> List[Dict[str, object]]:
    """One dict per trial with the INTERFACE.md trials.csv columns (one per objective), plus rounds,
    duration, and the `diag_*` / `stopped_early` attrs a trial carries."""
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
            if column not in objective_names:  # a system figure may be an objective (adapter_mb, min)
                row[column] = attrs.get(column)
        row["duration_s"] = round(trial.duration.total_seconds(), 1) if trial.duration else None
        row.update({k: v for k, v in sorted(attrs.items()) if k.startswith(DIAG_PREFIX)})
        if STOPPED_EARLY_KEY in attrs:
            row[STOPPED_EARLY_KEY] = attrs[STOPPED_EARLY_KEY]
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
    complete = [r for r in rows if r["state"] == "COMPLETE" and is_number(r.get(metric))]
    if not complete:
        return None
    # ties go to the earlier trial, so the choice is stable
    if mode == "max":
        return max(complete, key=lambda r: (r[metric], -r["number"]))
    return min(complete, key=lambda r: (r[metric], r["number"]))


def _dominates(a: Dict[str, object], b: Dict[str, object], objs: Sequence[Objective]) -> bool:
    """a is at least as good as b on every objective and better on one."""
    better = [(a[m] > b[m]) if mode == "max" else (a[m] < b[m]) for m, mode in objs]
    worse = [(a[m] < b[m]) if mode == "max" else (a[m] > b[m]) for m, mode in objs]
    return any(better) and not any(worse)


def pareto_front(rows: List[Dict[str, object]], objs: Sequence[Objective]) -> List[Dict[str, object]]:
    """The COMPLETE trials no other COMPLETE trial dominates, by trial number (equal trials all stay)."""
    complete = [r for r in rows if r["state"] == "COMPLETE" and all(is_number(r.get(m)) for m, _ in objs)]
    return [r for r in complete if not any(_dominates(other, r, objs) for other in complete)]


def best_trial(rows: List[Dict[str, object]], objs: Sequence[Objective]) -> Optional[Dict[str, object]]:
    """The best COMPLETE trial; with several objectives, the Pareto-front member best on the first."""
    metric, mode = objs[0]
    return best_row(rows if len(objs) == 1 else pareto_front(rows, objs), metric, mode)


RANK_FIGURES = ("tokens_per_s", "peak_mem_mb", "adapter_mb")


def ranks_tested(rows: List[Dict[str, object]]) -> List[int]:
    return sorted({int(r["param_r"]) for r in rows
                   if r["state"] in ("COMPLETE", "PRUNED") and is_number(r.get("param_r"))})


def rank_panel(rows: List[Dict[str, object]], metric: str, mode: str) -> List[Dict[str, object]]:
    """Per LoRA rank tested: the best `metric` over COMPLETE trials and the median system figures over
    COMPLETE and PRUNED ones (throughput, memory and adapter size do not depend on how long a trial
    trained), each also as `<name>/max`: the value over the value at the largest rank tested."""
    panel = []
    for r in ranks_tested(rows):
        at = [row for row in rows if row.get("param_r") == r and row["state"] in ("COMPLETE", "PRUNED")]
        best = best_row(at, metric, mode)
        entry: Dict[str, object] = {"r": r, "complete": sum(row["state"] == "COMPLETE" for row in at),
                                    "pruned": sum(row["state"] == "PRUNED" for row in at),
                                    metric: best[metric] if best else None}
        for name in RANK_FIGURES:
            values = [row[name] for row in at if is_number(row.get(name))]
            entry[name] = statistics.median(values) if values else None
        panel.append(entry)
    if panel:
        top = panel[-1]
        for name in (metric, *RANK_FIGURES):
            for entry in panel:
                value, ref = entry[name], top[name]
                entry[f"{name}/max"] = value / ref if is_number(value) and is_number(ref) and ref != 0 else None
    return panel


def failure_counts(rows: List[Dict[str, object]]) -> List[Tuple[str, int]]:
    """(reason, how many FAIL trials gave it), most frequent first."""
    counts: Dict[str, int] = {}
    for row in rows:
        if row["state"] == "FAIL":
            reason = str(row.get("fail_reason") or "no reason recorded")
            counts[reason] = counts.get(reason, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
