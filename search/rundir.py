"""The run directory of INTERFACE.md: RUNS_DIR/<name>/ with spec.yaml, trials.csv, report.md, best/."""
from __future__ import annotations

import json
import os

import yaml

from search.storage import check_storage, redact_url, study_name

SPEC_FILE = "spec.yaml"
SUMMARY_FILE = "search.json"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (e.g. it already holds a search)."""


def prepare_run_dir(spec, runs_dir: str) -> str:
    run_dir = os.path.abspath(os.path.join(runs_dir, spec.name))
    if os.path.exists(os.path.join(run_dir, SUMMARY_FILE)):
        raise RunDirError(f"{run_dir} already holds a search; choose another `name` or --runs-dir")
    # before the directory or Ray exist: an unreachable database, or SQLite on NFS, ends here with one line
    problem = check_storage(spec.storage, run_dir, search_name=study_name(spec.storage, spec.name))
    if problem:
        raise RunDirError(problem)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, SPEC_FILE), "w", encoding="utf-8") as handle:
        yaml.safe_dump(spec.to_dict(redact=True), handle, sort_keys=False)
    write_summary(run_dir, spec)
    return run_dir


def write_summary(run_dir: str, spec) -> None:
    """What `report` needs without re-validating the spec (whose data may have moved)."""
    summary = {
        "name": spec.name, "model": spec.model.name_or_path, "task": spec.model.task, "method": spec.peft.method,
        "metric": spec.objective.metric, "mode": spec.objective.mode, "algorithm": spec.search.algorithm,
        # the password of a database URL is never written; PEFT_SEARCH_STORAGE supplies the full URL later
        "scheduler": spec.search.scheduler, "trials": spec.search.trials, "storage": redact_url(spec.storage),
        "study": study_name(spec.storage, spec.name),
        "baseline": majority_baseline(spec),
    }
    with open(os.path.join(run_dir, SUMMARY_FILE), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir}: holds no search (no {SUMMARY_FILE})")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def majority_baseline(spec):
    """Accuracy of always predicting the most frequent training label, on the eval split."""
    if spec.model.task != "sequence-classification":
        return None
    from trainers.data import split_records

    data = spec.trial_settings({}).data
    train_rows, eval_rows = split_records(data)
    train_labels = [str(row[data.label_field]) for row in train_rows]
    eval_labels = [str(row[data.label_field]) for row in eval_rows]
    majority = max(sorted(set(train_labels)), key=train_labels.count)
    accuracy = sum(1 for label in eval_labels if label == majority) / len(eval_labels)
    return {"majority_label": majority, "eval_accuracy": accuracy, "eval_rows": len(eval_labels)}
