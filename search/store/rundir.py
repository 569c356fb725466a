"""The run directory of INTERFACE.md: RUNS_DIR/<name>/ with spec.yaml, trials.csv, report.md, best/."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import yaml

from search.store.remote import KEY, RemoteRun, RemoteStorageError
from search.store.storage import StorageError, check_storage, open_storage, redact_url, study_name

SPEC_FILE = "spec.yaml"
SUMMARY_FILE = "search.json"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (e.g. it already holds a search)."""


@dataclass(frozen=True)
class RunPlace:
    """Where one search lives, resolved once from its spec (search/run/driver.py's run_search) and handed
    down: its run directory, its Optuna study in its storage, and its copy on shared storage, if any."""
    name: str                     # the search's name
    run_dir: str                  # RUNS_DIR/<name>, absolute
    storage: str                  # the spec's storage: "sqlite" (a file in the run directory) or a database URL
    study: str                    # the Optuna study's name in that storage
    remote: Optional[RemoteRun]   # the run's copy under resources.storage_path, where one is set

    @classmethod
    def of(cls, spec, runs_dir: str) -> "RunPlace":
        return cls(name=spec.name, run_dir=os.path.abspath(os.path.join(runs_dir, spec.name)), storage=spec.storage,
                   study=study_name(spec.storage, spec.name),
                   remote=RemoteRun.of(spec.resources.storage_path, spec.name))

    def open_storage(self):
        return open_storage(self.storage, self.run_dir)

    def trial_dir(self, number: int) -> str:
        return trial_dir(self.run_dir, number)

    def ray_storage(self) -> Tuple[str, object]:
        """Ray's state: RUN_DIR/ray, or <storage_path>/<name>/ray where every node (and a later driver) finds it."""
        return self.remote.ray_storage() if self.remote else (os.path.join(self.run_dir, "ray"), None)


def prepare_run_dir(spec, place: RunPlace, resume: bool = False) -> dict:
    """Makes the run directory if needed and returns search.json's content; a directory that holds a search
    already is only taken with `resume`. Nothing is written in it yet."""
    run_dir = place.run_dir
    holds_search = os.path.exists(os.path.join(run_dir, SUMMARY_FILE))
    if holds_search and not resume:
        raise RunDirError(f"{run_dir} already holds a search; continue it with `peft-search resume {run_dir}`, "
                          f"or choose another `name` or --runs-dir")
    # before the directory or Ray exist: an unreachable database, or SQLite on NFS, ends here with one line;
    # a new search must not land in a study that another search holds
    problem = check_storage(place.storage, run_dir, search_name=None if holds_search else place.study)
    if problem:
        raise StorageError(problem)
    remote = place.remote
    if remote is not None and not holds_search and remote.exists(SUMMARY_FILE):
        # another search of this name (another driver's run directory) wrote there: its trials would mix in
        raise RemoteStorageError(f"{KEY}: {remote.url()} already holds a search named {spec.name!r}; "
                                 f"choose another `name` or storage_path")
    # Read first: the baseline reads the data (an HF dataset id downloads here, and may fail), and a
    # failure must leave no run directory behind.
    summary = run_summary(spec, place)   # DataError: validate reads local files only; a hub dataset may be missing
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as exc:   # a file where a directory should be, no permission: the user's to fix, no crash
        raise RunDirError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from exc
    return summary


def write_run_files(spec, run_dir: str, summary: dict) -> None:
    """spec.yaml (secrets redacted: `resume` reads it back) and search.json."""
    with open(os.path.join(run_dir, SPEC_FILE), "w", encoding="utf-8") as handle:
        yaml.safe_dump(spec.to_dict(redact=True), handle, sort_keys=False)
    write_summary(run_dir, spec, summary)


def write_summary(run_dir: str, spec, summary: Optional[dict] = None) -> None:
    """What `report` needs without re-validating the spec (whose data may have moved)."""
    with open(os.path.join(run_dir, SUMMARY_FILE), "w", encoding="utf-8") as handle:
        json.dump(summary or run_summary(spec, RunPlace.of(spec, os.path.dirname(run_dir))), handle, indent=2)


def run_summary(spec, place: RunPlace) -> dict:
    """search.json's content; reads the data for the majority-class baseline."""
    return {
        "name": spec.name, "model": spec.model.name_or_path, "task": spec.model.task, "method": spec.peft.method,
        "metric": spec.objective.metric, "mode": spec.objective.mode, "algorithm": spec.search.algorithm,
        "task_kind": spec.objective.task_kind, "threshold": spec.objective.threshold,
        # the password of a database URL is never written; PEFT_SEARCH_STORAGE supplies the full URL later
        "scheduler": spec.search.scheduler, "trials": spec.search.trials, "storage": redact_url(spec.storage),
        "study": place.study,
        # `report` fetches trials and uploads outputs there without the spec (it holds no credentials)
        "storage_path": spec.resources.storage_path,
        "baseline": majority_baseline(spec),
    }


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


TRIALS_SUBDIR = "trials"


def trial_dir(run_dir: str, number: int) -> str:
    return os.path.join(run_dir, TRIALS_SUBDIR, f"{number:04d}")


SETTINGS_FILE = "settings.json"


def write_settings(settings, directory: str) -> str:
    """`directory`/settings.json: what the trial ran with, for `python -m trainers.recipe --settings`."""
    import json

    from trainers.settings_io import settings_to_dict

    path = os.path.join(directory, SETTINGS_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(settings_to_dict(settings), handle, indent=2)
    return path
