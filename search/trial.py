"""One trial as Ray runs it: a Tune function whose trial runs on a persistent Ray Train worker group.

Every worker runs the same trainer recipe (trainers/recipe.py, through search/pool.py); the recipe reports
once per eval round on every rank, and rank 0's report travels through the pool to this function and on
to Tune (and so to ASHA and Optuna). A failure inside the workers comes back as one short reason string.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict

from search.remote_storage import RemoteRun, trial_parts
from search.trial_keys import FAIL_REASON_KEY, TRIAL_NUMBER_KEY

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
    them, and passes its reports on to Tune."""
    from dataclasses import replace

    import ray
    from ray import tune

    from search.pool import END

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
        ray.get(pool.submit.remote(number, job))
        over = False
        try:
            while True:
                kind, payload = ray.get(pool.next_report.remote(number))
                if kind == END:
                    over = True
                    break
                tune.report(payload)   # raises SystemExit when Tune stops the trial
        finally:
            if not over:   # stopped by Tune (or this function failed): the group moves on
                pool.cancel.remote(number)
        reason = payload
        if reason is None:
            return
        if attempt == retries or not worker_lost(reason):
            reason = reason if attempt == 0 else f"{reason} (after {attempt} retries)"
            # Reported, not raised: the searcher records a trial whose last report has a reason as FAIL, and
            # Tune keeps this function's actor for the next trial (a raise made it start another: 5 s here)
            tune.report({FAIL_REASON_KEY: reason})
            return
        print(f"trial {number}: {reason}; retrying from its last checkpoint ({attempt + 1}/{retries})", flush=True)


# How Ray reports a worker process that died under a trial (killed, out of the node, node lost): worth a
# retry. Anything else (divergence, out of memory, a bad setting) would fail the same way again.
# Seen here (Ray 2.60, a worker SIGKILLed): "WorkerGroupError: The actor is dead because its worker process has
# died. Worker exit type: SYSTEM_ERROR ...".
_WORKER_LOST = re.compile(r"worker process has died|actor is dead|ActorDiedError|RayActorError|WorkerCrashedError|"
                          r"NodeDiedError|ActorUnavailableError|died unexpectedly|node .* (?:was )?(?:lost|removed)",
                          re.IGNORECASE)


def worker_lost(reason: str) -> bool:
    return bool(_WORKER_LOST.search(reason)) and "OutOfMemoryError" not in reason


_TRIAL_FAILED = re.compile(r"TrialFailed: (.+)")
_LAST_EXCEPTION = re.compile(r"^(\w+(?:Error|Exception|Failed)): (.+)$", re.MULTILINE)


def failure_reason(exc: BaseException) -> str:
    """The recipe's own TrialFailed reason if there is one, else the innermost exception line."""
    text = str(exc)
    found = _TRIAL_FAILED.findall(text)
    if found:
        return found[-1].strip()
    lines = _LAST_EXCEPTION.findall(text)
    if lines:
        name, message = lines[-1]
        return f"{name}: {message.strip()}"[:500]
    return f"{type(exc).__name__}: {text.strip().splitlines()[-1] if text.strip() else 'no message'}"[:500]
