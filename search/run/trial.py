"""One trial as Ray runs it: a Tune function whose trial runs on a persistent Ray Train worker group.

Every worker runs the same trainer recipe (trainers/recipe.py, through search/run/pool.py); the recipe reports
once per eval round on every rank, and rank 0's report travels through the pool to this function and on
to Tune (and so to ASHA and Optuna). A failure inside the workers comes back as one short reason string.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from search.run.protocol import END, TrialJob, worker_lost
from search.store.keys import FAIL_REASON_KEY, FAILED_ON_KEY, INFRASTRUCTURE, RETRIES_KEY, TRIAL_NUMBER_KEY
from search.store.remote import one_line, trial_parts
from search.store.rundir import SETTINGS_FILE, RunPlace, write_settings


def tune_trial(config: Dict[str, Any], spec, place: RunPlace, threads_per_worker: int, pool) -> None:
    """The Tune trainable: builds the trial's settings, has a worker group of `pool` (search/run/pool.py) run
    them, and passes its reports on to Tune. A trial whose workers were lost (killed, their node gone) runs
    again from its last checkpoint on a group that works, up to `search.max_failures` times."""
    from dataclasses import replace

    from ray import tune

    number = config[TRIAL_NUMBER_KEY]
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER_KEY}
    settings = spec.trial_settings(params)
    settings = replace(settings, engine=replace(settings.engine, num_threads=threads_per_worker),
                       # the first trial also answers with its adapter off: the base model's zero-shot score
                       generation=replace(settings.generation, base_answers=spec.generation.base_model and number == 0))
    output_dir = place.trial_dir(number)
    os.makedirs(output_dir, exist_ok=True)
    write_settings(settings, output_dir)  # best/ copies it; the report's reproduce command reads it
    remote = place.remote
    if remote is not None:   # this function's node need not be the worker's, whose uploads have the rest
        remote.upload(os.path.join(output_dir, SETTINGS_FILE), *trial_parts(number, SETTINGS_FILE))
    job = TrialJob(number=number, settings=settings, output_dir=output_dir, run_dir=place.run_dir,
                   search_name=place.name, params=spec.decode(params), tracking=spec.tracking, remote=remote)
    retries = spec.search.max_failures
    for attempt in range(retries + 1):
        try:
            reason = _run_attempt(pool, replace(job, attempt=attempt), tune.report)
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


def _run_attempt(pool, job: TrialJob, report) -> Optional[str]:
    """Run the trial once on a group of `pool`, passing each report to `report`; its failure reason, or None
    when it finished or Tune stopped it."""
    import ray

    number, attempt = job.number, job.attempt

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
