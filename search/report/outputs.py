"""Rebuild the run directory's outputs from the Optuna storage: trials.csv, best/, report.md, report.html."""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Dict, List, Optional, Tuple

from search.report import html as report_html
from search.report import sections as report
from search.store.keys import REFINEMENTS_ATTR
from search.store.packing_file import read_packing
from search.store.remote import KEY, RemoteRun, one_line
from search.store.results import best_trial, load_study, objectives, trial_rows, write_trials_csv
from search.store.rundir import SETTINGS_FILE, RunDirError, read_summary, trial_dir
from search.store.storage import SQLITE_FILE, STUDY_NAME, StorageError, open_storage, redact_url, saved_storage

TRIALS_CSV = "trials.csv"
BEST_DIR = "best"
ADAPTER_CONFIG = "adapter_config.json"
log = logging.getLogger("peft_search")

# peft_type -> the PEFT config class that builds it (the methods of trainers/settings.PEFT_METHODS)
PEFT_CONFIG_CLASSES = {"LORA": "LoraConfig", "PROMPT_TUNING": "PromptTuningConfig",
                       "PREFIX_TUNING": "PrefixTuningConfig", "IA3": "IA3Config"}
# Written by save_pretrained for loading the adapter, not settings of it; inference_mode is True in a
# saved adapter, and a config to train with wants the default (False).
BOOKKEEPING_KEYS = ("peft_type", "auto_mapping", "base_model_name_or_path", "revision", "peft_version",
                    "inference_mode")


def storage_for(run_dir: str, summary: dict) -> str:
    """The full storage of the search in `run_dir`: its SQLite file, or the database URL, whose password comes
    from PEFT_SEARCH_STORAGE (search.json keeps it redacted)."""
    if summary["storage"] == "sqlite":
        if not os.path.isfile(os.path.join(run_dir, SQLITE_FILE)):
            raise FileNotFoundError(f"{run_dir}: no {SQLITE_FILE}; the search never started")
        return "sqlite"
    return saved_storage(summary["storage"])


def open_study(run_dir: str, summary: dict, storage: Optional[str] = None):
    """The search's Optuna study (in `storage`, the full one, when the caller has it: the driver has the spec's);
    RunDirError (exit 2 at the CLI) when its storage is out of reach."""
    name = summary.get("study", STUDY_NAME)   # run directories from before per-search study names
    try:
        storage = storage or storage_for(run_dir, summary)
        opened = open_storage(storage, run_dir)
    except StorageError as exc:
        raise RunDirError(str(exc)) from None
    try:
        return load_study(opened, name)
    except KeyError:   # no study of that name there (e.g. PEFT_SEARCH_STORAGE names another database)
        raise RunDirError(f"storage: {redact_url(storage)} holds no study named {name!r}") from None


def refresh(run_dir: str, wall_s: Optional[float] = None, storage: Optional[str] = None) -> List[dict]:
    """Write trials.csv, best/, report.md and report.html; returns the trial rows.

    `storage`: the spec's full storage, when the caller has it (the driver); else search.json's and
    PEFT_SEARCH_STORAGE."""
    summary = read_summary(run_dir)
    objs = objectives(summary)
    study = open_study(run_dir, summary, storage)
    trials = study.get_trials(deepcopy=False)
    rows = trial_rows(trials, [metric for metric, _ in objs])
    write_trials_csv(rows, os.path.join(run_dir, TRIALS_CSV))
    best = best_trial(rows, objs)
    remote = RemoteRun.of(summary.get("storage_path"), summary["name"])
    if best is not None and remote is not None:
        _fetch_trial(remote, run_dir, int(best["number"]))
    published = best is not None and _publish_best(run_dir, best)
    if wall_s is None:
        wall_s = previous_wall(run_dir)
    else:
        _record_wall(run_dir, wall_s)
    from search.refine.next_search import write_next_search
    from search.refine.sensitivity import importances
    from search.report import figures
    from search.report.answers import read_answers

    (metric, mode), several = objs[0], len(objs) > 1
    settings = os.path.join(run_dir, BEST_DIR, SETTINGS_FILE)
    scores = importances(study) if report.enough_for_sensitivity(rows) else None
    data = report.ReportInput(
        run_dir=run_dir, summary=summary, rows=rows, best=best, wall_s=wall_s,
        importances=scores,
        refinements=_refinements(study.user_attrs.get(REFINEMENTS_ATTR)),
        peft_config=best_peft_config(run_dir, best) if best is not None else None,
        settings_path=settings if published and os.path.isfile(settings) else None,
        adapter_dir=os.path.join(run_dir, BEST_DIR) if published else None,
        packing=read_packing(run_dir),
        # several objectives have no one best region to move the space to
        next_search=None if several else write_next_search(run_dir, study, rows, metric, mode, scores),
        # not Optuna's slice plot: it leaves pruned trials out, and the Sensitivity section's slices show them
        study_figures=[draw(study, metric) for draw in (figures.optimization_history, figures.parallel_coordinates,
                                                        figures.contour, figures.importances)],
        answers=read_answers(trials, best))
    report.write_report(run_dir, report.build_report(data))
    report_html.write_html(run_dir, report_html.build_html(data))
    if remote is not None:
        try:
            remote.upload_outputs(run_dir)
        except OSError as exc:   # the run directory keeps them; `peft-search report` uploads them again
            log.warning(f"{KEY}: could not upload the outputs to {remote.url()}: {one_line(exc)}")
    return rows


def _fetch_trial(remote: RemoteRun, run_dir: str, number: int) -> None:
    """The trial's adapter from the store, where its worker ran on another node (no shared filesystem)."""
    local = trial_dir(run_dir, number)
    if os.path.isdir(os.path.join(local, "adapter")):
        return
    try:
        remote.fetch_trial(local, number)
    except OSError as exc:   # best/ stays as it was; the report says no adapter was saved
        log.warning(f"{KEY}: could not fetch trial {number} from {remote.url()}: {one_line(exc)}")


def _refinements(stored) -> list:
    """The refinements list; a JSON string of one is read, anything else is shown as one entry."""
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except ValueError:
            return [stored]
    if stored is None:
        return []
    return list(stored) if isinstance(stored, (list, tuple)) else [stored]


def _publish_best(run_dir: str, best: dict) -> bool:
    """best/ := the trial's adapter, its settings.json and its metrics; False if it saved no adapter."""
    source_dir = trial_dir(run_dir, int(best["number"]))
    source = os.path.join(source_dir, "adapter")
    if not os.path.isdir(source):
        return False
    target = os.path.join(run_dir, BEST_DIR)
    staging = target + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    if os.path.isfile(os.path.join(source_dir, SETTINGS_FILE)):
        shutil.copy2(os.path.join(source_dir, SETTINGS_FILE), os.path.join(staging, SETTINGS_FILE))
    with open(os.path.join(staging, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump({k: v for k, v in best.items() if v not in ("", None)}, handle, indent=2, default=str)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return True


def best_peft_config(run_dir: str, best: dict) -> Optional[Tuple[str, dict]]:
    path = os.path.join(trial_dir(run_dir, int(best["number"])), "adapter", ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as handle:
            return ready_peft_config(json.load(handle))
    except (OSError, ValueError):
        return None


def ready_peft_config(adapter_config: Dict[str, object]) -> Tuple[str, dict]:
    """(how to build it, kwargs) from a saved adapter_config.json: what `LoraConfig(**kwargs)` (or the
    method's config class) accepts to train the same adapter again.

    Unset keys (None, {}) are left out: for the four methods their defaults are None or {} too, so the
    config is the same and reads shorter. A peft_type outside the four keeps its `peft_type` key, for
    `peft.get_peft_config`."""
    peft_type = str(adapter_config.get("peft_type"))
    known = peft_type in PEFT_CONFIG_CLASSES
    config = {k: v for k, v in adapter_config.items()
              if v is not None and v != {} and not (k in BOOKKEEPING_KEYS and (known or k != "peft_type"))}
    return (f"{PEFT_CONFIG_CLASSES[peft_type]}(**config)" if known else "peft.get_peft_config(config)"), config


def _wall_file(run_dir: str) -> str:
    return os.path.join(run_dir, "wall_s.txt")


def _record_wall(run_dir: str, wall_s: float) -> None:
    with open(_wall_file(run_dir), "w") as handle:
        handle.write(f"{wall_s:.1f}\n")


def previous_wall(run_dir: str) -> Optional[float]:
    try:
        with open(_wall_file(run_dir)) as handle:
            return float(handle.read())
    except (OSError, ValueError):
        return None
