"""What the trial function, the trial pool and the worker loops say to each other, and how a failed
trial's reason is told apart: its own settings' fault, or lost workers (worth a retry elsewhere).

The pool hands each trial's reports to its Tune function as (REPORT, metrics) ... then (END, reason or None);
the function answers each report with GO_ON or STOP; a group asking for work gets a job, NO_TRIAL or CLOSED.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

REPORT, END = "report", "end"
NO_TRIAL, CLOSED = "no trial", "closed"
GO_ON, STOP = "go on", "stop"


@dataclass(frozen=True)
class TrialJob:
    """One trial as the trial function hands it to a worker group (search/run/trial.py -> search/run/pool.py)."""
    number: int                  # the Optuna trial number
    settings: Any                # trainers.settings.TrialSettings
    output_dir: str              # the trial's directory in the run directory
    run_dir: str
    search_name: str
    params: Dict[str, Any]       # the sampled settings as the user reads them (W&B's config)
    tracking: Any                # the spec's tracking section
    remote: Optional[Any]        # search.store.remote.RemoteRun: the run's copy on shared storage, or None
    attempt: int = 0             # 0, then 1, 2, ... each time it runs again after its workers were lost


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
