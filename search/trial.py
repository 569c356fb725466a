"""One trial as Ray runs it: a Tune function that launches a Ray Train worker group.

Every worker runs the same trainer recipe (trainers/recipe.py); the recipe reports once per eval
round on every rank, and rank 0's report travels to Tune (and so to ASHA and Optuna) through
`TuneReportCallback`. A failure inside the workers comes back as one short reason string.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict

from search.searcher import FAIL_REASON_KEY, TRIAL_NUMBER_KEY

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


def worker_loop(config: Dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the trainer recipe with reports going to Ray Train.

    Rank 0 also logs each round to the trial's W&B run (every rank reports to Ray Train, the same
    number of times, or the group would hang)."""
    import ray.train

    from search.tracking import start_trial
    from trainers.checkpoint import has_checkpoint
    from trainers.recipe import run_trial

    tracker = None
    if ray.train.get_context().get_world_rank() == 0:
        tracker = start_trial(config["run_dir"], config["search_name"], config["number"], config["params"],
                              config["tracking"])

    def report(metrics: dict) -> None:
        if tracker is not None:
            tracker.log_round(metrics)
        ray.train.report(metrics)

    state = "FAIL"
    output_dir = config["output_dir"]
    try:
        # a retried trial, or one whose driver died, goes on from its last finished round
        run_trial(config["settings"], report, output_dir, resume_from=output_dir if has_checkpoint(output_dir) else None)
        state = "COMPLETE"
    finally:  # a trial that ASHA stops is killed: its W&B run stays open and `wandb sync` closes it
        if tracker is not None:
            tracker.finish({}, state)


def tune_trial(config: Dict[str, Any], spec, run_dir: str, threads_per_worker: int) -> None:
    """The Tune trainable: builds the trial's settings and runs them on a worker group."""
    from dataclasses import replace

    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    number = config[TRIAL_NUMBER_KEY]
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER_KEY}
    settings = spec.trial_settings(params)
    settings = replace(settings, engine=replace(settings.engine, num_threads=threads_per_worker))
    output_dir = trial_dir(run_dir, number)
    os.makedirs(output_dir, exist_ok=True)
    write_settings(settings, output_dir)  # best/ copies it; the report's reproduce command reads it
    resources = spec.resources
    loop_config = {"settings": settings, "output_dir": output_dir, "run_dir": run_dir, "number": number,
                   "search_name": spec.name, "params": spec.decode(params), "tracking": spec.tracking}
    scaling = ScalingConfig(
        num_workers=resources.workers_per_trial,
        use_gpu=resources.gpus_per_worker > 0,
        resources_per_worker={"CPU": resources.cpus_per_worker,
                              **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {})},
    )
    retries = spec.search.max_failures
    for attempt in range(retries + 1):
        # a new worker group per attempt: the one whose process died is gone
        name = f"trial_{number:04d}" + (f"_retry{attempt}" if attempt else "")
        trainer = TorchTrainer(worker_loop, train_loop_config=loop_config, scaling_config=scaling,
                               run_config=RunConfig(name=name, storage_path=os.path.join(run_dir, "ray"),
                                                    callbacks=[TuneReportCallback()]))
        try:
            trainer.fit()
            return
        except Exception as exc:  # the worker's exception arrives wrapped; keep its one-line reason
            reason = failure_reason(exc)
            if attempt == retries or not worker_lost(reason):
                reason = reason if attempt == 0 else f"{reason} (after {attempt} retries)"
                tune.report({FAIL_REASON_KEY: reason})
                raise RuntimeError(reason) from None
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
