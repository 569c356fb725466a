"""Rebuild the run directory's outputs from the Optuna storage: trials.csv, best/, report.md."""
from __future__ import annotations

import json
import os
import shutil
from typing import List, Optional

from search import report
from search.results import best_row, load_study, trial_rows, write_trials_csv
from search.rundir import read_summary
from search.storage import SQLITE_FILE, open_storage
from search.trial import trial_dir

TRIALS_CSV = "trials.csv"
BEST_DIR = "best"


def storage_for(run_dir: str, summary: dict) -> str:
    if summary["storage"] == "sqlite":
        if not os.path.isfile(os.path.join(run_dir, SQLITE_FILE)):
            raise FileNotFoundError(f"{run_dir}: no {SQLITE_FILE}; the search never started")
        return "sqlite"
    # the saved URL has its password redacted; the environment holds the real one
    return os.environ.get("PEFT_SEARCH_STORAGE", summary["storage"])


def refresh(run_dir: str, wall_s: Optional[float] = None) -> List[dict]:
    """Write trials.csv, best/ and report.md; returns the trial rows."""
    summary = read_summary(run_dir)
    study = load_study(open_storage(storage_for(run_dir, summary), run_dir))
    rows = trial_rows(study.get_trials(deepcopy=False), [summary["metric"]])
    write_trials_csv(rows, os.path.join(run_dir, TRIALS_CSV))
    best = best_row(rows, summary["metric"], summary["mode"])
    if best is not None:
        _publish_best(run_dir, best)
    if wall_s is None:
        wall_s = _previous_wall(run_dir)
    else:
        _record_wall(run_dir, wall_s)
    from search.sensitivity import importances

    text = report.build_report(run_dir, summary, rows, best, summary.get("baseline"), wall_s,
                               importances_by_method=importances(study) if report.enough_for_sensitivity(rows) else None)
    report.write_report(run_dir, text)
    return rows


def _publish_best(run_dir: str, best: dict) -> None:
    source = os.path.join(trial_dir(run_dir, int(best["number"])), "adapter")
    if not os.path.isdir(source):
        return
    target = os.path.join(run_dir, BEST_DIR)
    staging = target + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    with open(os.path.join(staging, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump({k: v for k, v in best.items() if v not in ("", None)}, handle, indent=2, default=str)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def _wall_file(run_dir: str) -> str:
    return os.path.join(run_dir, "wall_s.txt")


def _record_wall(run_dir: str, wall_s: float) -> None:
    with open(_wall_file(run_dir), "w") as handle:
        handle.write(f"{wall_s:.1f}\n")


def _previous_wall(run_dir: str) -> Optional[float]:
    try:
        with open(_wall_file(run_dir)) as handle:
            return float(handle.read())
    except (OSError, ValueError):
        return None
