"""One trial as Ray runs it: a Tune function whose trial runs on a persistent Ray Train worker group.

Every worker runs the same trainer recipe (trainers/recipe.py, through search/pool.py); the recipe reports
once per eval round on every rank, and rank 0's report travels through the pool to this function and on
to Tune (and so to ASHA and Optuna). A failure inside the workers comes back as one short reason string.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional

from search.remote_storage import RemoteRun, one_line, trial_parts
from search.trial_keys import FAIL_REASON_KEY, FAILED_ON_KEY, INFRASTRUCTURE, RETRIES_KEY, TRIAL_NUMBER_KEY

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


def tune_trial(config: Dict[str, Any], spec, run_dir: str, threads_per_worker: int, pool) -> None:
    """The Tune trainable: builds the trial's settings, has a worker group of `pool` (search/pool.py) run
    them, and passes its reports on to Tune. A trial whose workers were lost (killed, their node gone) runs
    again from its last checkpoint on a group that works, up to `search.max_failures` times."""
    from dataclasses import replace

    from ray import tune

    number = config[TRIAL_NUMBER_KEY]
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER_KEY}
    settings = spec.trial_settings(params)
    settings = replace(settings, engine=replace(settings.engine, num_threads=threads_per_worker))
    output_dir = trial_dir(run_dir, number)
    os.makedirs(output_dir, exist_ok=True)
    write_settings(settings, output_dir)  # best/ copies it; the report's reproduce command reads it
    remote = RemoteRun.of(spec.resources.storage_path, spec.name)
    if remote is not None:   # this function's node need not be the worker's, whose uploads have the rest
        remote.upload(os.path.join(output_dir, SETTINGS_FILE), *trial_parts(number, SETTINGS_FILE))
    job = {"settings": settings, "output_dir": output_dir, "run_dir": run_dir, "number": number,
           "search_name": spec.name, "params": spec.decode(params), "tracking": spec.tracking, "remote": remote}
    retries = spec.search.max_failures
    for attempt in range(retries + 1):
        try:
            reason = _run_attempt(pool, {**job, "attempt": attempt}, tune.report)
        except PoolLost as exc:   # nothing can run the trial now; a resumed search runs it again
            reason, lost, attempt_left = str(exc), True, False
        else:
            if reason is None:
                return
            lost, attempt_left = worker_lost(reason), attempt < retries
        if not (lost and attempt_left):
            reason = reason if attempt == 0 else f"{reason} (after {attempt} retries)"
            # Reported, not raised: the searcher records a trial whose last report has a reason as FAIL, and
            # Tune keeps this function's actor for the next trial (a raise made it start another process)
            tune.report({FAIL_REASON_KEY: reason, RETRIES_KEY: attempt,
                         **({FAILED_ON_KEY: INFRASTRUCTURE} if lost else {})})
            return
        print(f"trial {number}: {reason}; retrying from its last checkpoint ({attempt + 1}/{retries})", flush=True)


class PoolLost(RuntimeError):
    """The search's TrialPool actor is gone (its node lost): no trial of this driver can run any more."""


def _run_attempt(pool, job: Dict[str, Any], report) -> Optional[str]:
    """Run the trial once on a group of `pool`, passing each report to `report`; its failure reason, or None
    when it finished or Tune stopped it."""
    import ray

    from search.pool import END

    number, attempt = job["number"], job["attempt"]

    def ask(call):
        try:
            return ray.get(call)
        except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError) as exc:
            raise PoolLost(f"the trial pool was lost: {one_line(exc)}") from None

    ask(pool.submit.remote(number, job))
    over = False
    try:
        while True:
            kind, payload = ask(pool.next_report.remote(number))
            if kind == END:
                over = True
                return payload
            if attempt:
                payload[RETRIES_KEY] = attempt
            report(payload)   # raises SystemExit when Tune stops the trial
    finally:
        if not over:   # stopped by Tune (or this function failed): the group moves on
            pool.cancel.remote(number)


# How Ray 2.60 says that a trial's workers were lost (the process killed, its node gone or cut off): worth a
# retry on a group that works. Anything else (divergence, out of memory, a bad setting) would fail the same way
# again. A node loss is reported first as the actor being unavailable, then, once the node is marked dead, as
# the actor having died with it, e.g. (tests/cluster/test_node_loss.py has the full texts):
#   "The actor 19dd... is unavailable: The actor is temporarily unavailable: RpcError: RPC error: Socket closed"
#   "The actor died unexpectedly before finishing this task. The actor died because its node has died."
#   "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR ..."
_WORKER_LOST = re.compile(
    r"worker lost|worker process has died|actor is dead|actor died|died unexpectedly|"
    r"actor (?:\w+ )?is unavailable|actor is temporarily unavailable|\bRpcError\b|"
    r"ActorDiedError|RayActorError|ActorUnavailableError|WorkerCrashedError|NodeDiedError|LocalRayletDiedError|"
    r"OwnerDiedError|raylet died|owner has (?:died|exited)|its node has died|"
    r"node (?:it was running on )?is dead|lost due to node failure|node .* (?:was )?(?:lost|removed)|"
    r"WorkerGroupStartupFailedError|WorkerHealthCheckTimeoutError|PreemptionError|preempted",
    re.IGNORECASE)
# A process that ran out of memory (Ray's memory monitor kills one as its node runs low): its own settings'
# doing, not the cluster's.
_OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|out of memory|OUT_OF_MEMORY|low on memory", re.IGNORECASE)
LOST_PREFIX = "worker lost: "


def worker_lost(reason: str) -> bool:
    """Whether a trial's failure reason says only that its workers were lost: the trial is worth a retry."""
    return bool(_WORKER_LOST.search(reason)) and not _OUT_OF_MEMORY.search(reason)


def lost_to_infrastructure(exc: BaseException) -> bool:
    """Whether `exc` (what a worker group's run raised) comes from lost workers, by the exception types Ray
    wraps in it (a worker's RayActorError inside Ray Train's WorkerGroupError ...) or else by its text."""
    import ray.exceptions as rex

    kinds = (rex.RayActorError, rex.NodeDiedError, rex.WorkerCrashedError, rex.LocalRayletDiedError,
             rex.OwnerDiedError, rex.RpcError)
    found = any(isinstance(cause, kinds) or type(cause).__name__ in _LOST_TRAIN_ERRORS for cause in _causes(exc))
    text = str(exc)
    return (found or bool(_WORKER_LOST.search(text))) and not _OUT_OF_MEMORY.search(text)


# Ray Train's own (internal) exceptions for workers that could not start or answer: named, not imported
_LOST_TRAIN_ERRORS = {"WorkerGroupStartupFailedError", "WorkerGroupStartupTimeoutError",
                      "WorkerHealthCheckTimeoutError", "PreemptionError"}


def _causes(exc: BaseException, depth: int = 0):
    """`exc` and what it wraps: its cause, Ray Train's per-worker failures and controller failure, a task's cause
    (not the exceptions it was merely raised while handling)."""
    if exc is None or depth > 8:
        return
    yield exc
    inner = [exc.__cause__, getattr(exc, "controller_failure", None),
             getattr(exc, "health_check_failure", None), getattr(exc, "cause", None)]
    inner += list((getattr(exc, "worker_failures", None) or {}).values())
    for each in inner:
        if isinstance(each, BaseException) and each is not exc:
            yield from _causes(each, depth + 1)


_TRIAL_FAILED = re.compile(r"TrialFailed: (.+)")
_LAST_EXCEPTION = re.compile(r"^(\w+(?:Error|Exception|Failed)): (.+)$", re.MULTILINE)


def failure_reason(exc: BaseException) -> str:
    """The recipe's own TrialFailed reason if there is one, else the innermost exception line; a reason for
    lost workers always says so (`worker_lost` recognises it)."""
    text = str(exc)
    found = _TRIAL_FAILED.findall(text)
    if found:
        return found[-1].strip()
    lines = _LAST_EXCEPTION.findall(text)
    if lines:
        name, message = lines[-1]
        reason = f"{name}: {message.strip()}"[:500]
    else:
        reason = f"{type(exc).__name__}: {text.strip().splitlines()[-1] if text.strip() else 'no message'}"[:500]
    if not worker_lost(reason) and lost_to_infrastructure(exc):
        reason = LOST_PREFIX + reason
    return reason
