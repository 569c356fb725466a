"""Continuing a search after its driver stopped (killed, Ctrl-C, node lost), with the Optuna storage as the truth.

The storage holds every trial the search asked for. On resume:
- finished trials (COMPLETE, PRUNED, FAIL) are kept and never rerun, except
- FAIL trials that only the cluster failed (`failed_on: infrastructure`: lost nodes or workers past their
  retries, a lost trial pool): they are made RUNNING again and then run as interrupted ones;
- trials left RUNNING were interrupted: each runs again under its own Optuna trial (same number and
  parameters), from its last per-round checkpoint in trials/NNNN/checkpoint when there is one;
- new trials fill the rest up to `search.trials`, asked from the same study, so the sampler sees every
  earlier trial (TPE keeps its model; no fall-back to random start-up trials).
A search's space and objective are recorded in the study when it starts; resuming with other ones is
refused, since the earlier trials would then not belong to the search being continued.
Only one driver may work in a run directory at a time (`DriverLock`).
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from typing import Dict, List

from optuna.distributions import distribution_to_json
from optuna.trial import TrialState

from search.store.keys import FAIL_REASON_KEY, FAILED_ON_KEY, INFRASTRUCTURE, INFRASTRUCTURE_RERUNS_ATTR
from search.store.rundir import RunDirError

SPACE_ATTR, OBJECTIVE_ATTR = "space", "objective"
LOCK_FILE = "driver.lock"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class ResumeError(ValueError):
    """The search cannot be continued as asked (another space or objective, nothing to resume)."""


def fingerprint(spec) -> Dict[str, str]:
    """What must not change between a search's start and its resume, as study user attributes."""
    space = {name: json.loads(distribution_to_json(dist)) for name, dist in sorted(spec.search_space().items())}
    objective = {"metric": spec.objective.metrics, "mode": spec.objective.modes}
    return {SPACE_ATTR: json.dumps(space, sort_keys=True), OBJECTIVE_ATTR: json.dumps(objective, sort_keys=True)}


def record_or_check(study, spec) -> None:
    """Record the spec's fingerprint in a new study; raise ResumeError if an existing study holds another."""
    current = fingerprint(spec)
    stored = {key: study.user_attrs.get(key) for key in current}
    if all(value is None for value in stored.values()):
        for key, value in current.items():
            study.set_user_attr(key, value)
        return
    problems = []
    if stored[SPACE_ATTR] != current[SPACE_ATTR]:
        change = _space_change(stored[SPACE_ATTR], current[SPACE_ATTR])
        problems.append(f"space: differs from the space the search started with ({change})")
    if stored[OBJECTIVE_ATTR] != current[OBJECTIVE_ATTR]:
        problems.append(f"objective: differs from the one the search started with "
                        f"(was {stored[OBJECTIVE_ATTR]}, now {current[OBJECTIVE_ATTR]})")
    if problems:
        raise ResumeError("; ".join(problems) + "; resume needs the same space and objective: start a new search "
                          "under another `name` instead")


def _space_change(before: str, after: str) -> str:
    old, new = json.loads(before), json.loads(after)
    parts = [f"added {name}" for name in sorted(set(new) - set(old))]
    parts += [f"removed {name}" for name in sorted(set(old) - set(new))]
    parts += [f"{name} changed" for name in sorted(set(old) & set(new)) if old[name] != new[name]]
    return ", ".join(parts)


@dataclass
class ResumePlan:
    finished: int
    interrupted: List[int]   # Optuna trial numbers to run again
    new: int                 # trials still to ask for

    @property
    def asked(self) -> int:
        """Trials the search asked for before this driver: nonzero means it is a resumed search."""
        return self.finished + len(self.interrupted)

    @property
    def to_run(self) -> int:
        return len(self.interrupted) + self.new


def plan(study, total: int) -> ResumePlan:
    trials = study.get_trials(deepcopy=False)
    finished = sum(1 for trial in trials if trial.state in FINISHED)
    interrupted = sorted(trial.number for trial in trials if trial.state == TrialState.RUNNING)
    return ResumePlan(finished, interrupted, max(0, total - finished - len(interrupted)))


def infrastructure_failures(study) -> List[int]:
    """Numbers of the FAIL trials that only the cluster failed (search/run/trial.py marks them)."""
    return sorted(trial.number for trial in _failed_by_cluster(study))


def _failed_by_cluster(study) -> list:
    return [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if trial.user_attrs.get(FAILED_ON_KEY) == INFRASTRUCTURE]


def rerun_infrastructure_failures(study) -> List[int]:
    """Make the trials of `infrastructure_failures` RUNNING again, as a killed driver leaves its trials: `plan`
    then counts them interrupted, and they run again under their own number and parameters, from their last
    checkpoint. Their failure reason goes; `infrastructure_reruns` counts the reruns. Returns their numbers.

    Optuna never reopens a finished trial, so this writes its RDB tables (SQLite and PostgreSQL alike); `study`
    (and any cache of its trials) must be loaded again afterwards."""
    import sqlalchemy

    trials = _failed_by_cluster(study)
    if not trials:
        return []
    backend = getattr(study._storage, "_backend", study._storage)   # Optuna's cache wraps the RDBStorage
    reopen = sqlalchemy.text("UPDATE trials SET state = 'RUNNING', datetime_complete = NULL "
                             "WHERE trial_id = :trial AND state = 'FAIL'")
    forget = sqlalchemy.text("DELETE FROM trial_user_attributes WHERE trial_id = :trial AND key IN (:reason, :on)")
    with backend.engine.begin() as connection:   # all of them or none
        for trial in trials:
            connection.execute(reopen, {"trial": trial._trial_id})
            connection.execute(forget, {"trial": trial._trial_id, "reason": FAIL_REASON_KEY, "on": FAILED_ON_KEY})
    for trial in trials:
        backend.set_trial_user_attr(trial._trial_id, INFRASTRUCTURE_RERUNS_ATTR,
                                    int(trial.user_attrs.get(INFRASTRUCTURE_RERUNS_ATTR, 0)) + 1)
    return [trial.number for trial in trials]


class DriverLock:
    """An exclusive lock on RUN_DIR/driver.lock for as long as a driver runs the search there.

    flock is released by the kernel when the process dies, SIGKILL included, so a killed driver never
    leaves a stale lock, and a second driver (a double `resume`) cannot run the same trials twice."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._handle = None

    def __enter__(self) -> "DriverLock":
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(f"{os.path.dirname(self.path)}: a search is running there now ({holder}); "
                              f"wait for it or stop it first") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def load_run_spec(run_dir: str, embedded: bool = True):
    """(the spec a run directory's search was started with, problems): its spec.yaml, checked again (the
    data must still be there; GPUs on this machine if `embedded`), with the secrets that spec.yaml does not
    hold taken from the environment."""
    from dataclasses import replace

    from search.spec.validate import check_file
    from search.store.rundir import SPEC_FILE, read_summary
    from search.store.storage import REDACTED, StorageError, saved_storage

    try:
        read_summary(run_dir)
    except RunDirError as exc:
        return None, [f"RUN_DIR: {exc}"]
    spec, problems, _warnings = check_file(os.path.join(run_dir, SPEC_FILE), embedded=embedded)
    if spec is None:
        return None, problems
    if spec.name != os.path.basename(run_dir):
        # the name keys W&B run ids and the run directory: a renamed directory would fork the search
        return None, [f"RUN_DIR: named {os.path.basename(run_dir)!r}, but its search is {spec.name!r}; "
                      f"give the directory its name back"]
    try:
        spec = replace(spec, storage=saved_storage(spec.storage))   # the password: from PEFT_SEARCH_STORAGE
    except StorageError as exc:
        return None, [str(exc)]
    if spec.tracking.api_key == REDACTED:   # the key comes from WANDB_API_KEY or `wandb login` instead
        spec = replace(spec, tracking=replace(spec.tracking, api_key=None))
    return spec, []
