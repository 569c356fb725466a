"""Connecting to Ray: the embedded local cluster by default, an existing cluster by address.

Why the logical CPU count is above the core count: a Tune trial that launches a Ray Train worker
group holds its own slot while the group's workers ask for theirs, and a finished trial's group
releases its CPU a moment after the next trial asks. With exactly as many logical CPUs as cores
the next group waits forever. Threads are set per
worker instead, so the cores are not oversubscribed.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Optional

# Environment every Ray worker gets: one tokenizer thread pool is plenty, and Ray's own
# metrics exporter and usage reporting would only try to reach the network.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


# Where the workers' stdout/stderr that Ray forwards to this driver (log_to_driver) go: None, Ray prints them on
# the driver's terminal as usual; a function, it gets each batch (Ray's dict: "lines", "pid", "actor_name",
# "task_name", "ip", "is_err", ...). search/run/console.py points it at the run's log file while a search runs.
worker_output_sink: Optional[Callable[[dict], None]] = None
RAY_PRINT_LOGS = "ray_print_logs"   # the name ray.init gives its printing handler of the forwarded lines


# Only on the embedded one-machine Ray: Ray Train's preemption watcher (a process per worker group) watches for
# spot nodes being taken away, which a laptop's Ray has none of.
EMBEDDED_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def physical_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_worker(concurrency: int, workers_per_trial: int) -> int:
    """Torch threads for each trial worker so that all running workers share the cores."""
    return max(1, physical_cores() // max(1, concurrency * workers_per_trial))


def logical_cpus(concurrency: int, cpus_per_trial: float) -> int:
    # each running trial: its workers plus headroom for the group that is still shutting down
    return max(physical_cores(), math.ceil(2 * concurrency * cpus_per_trial) + 2)


def connect(address: Optional[str], concurrency: int, cpus_per_trial: float) -> bool:
    """Start or join Ray. Returns True when this process started an embedded cluster."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        route_worker_output()
        return False
    if address:
        ray.init(address=address, runtime_env={"env_vars": _env_not_set_by_job()}, log_to_driver=True)
        route_worker_output()
        _note_session_dir()
        return False
    # The GCS port is chosen here so that the workers can be told the address: Ray Train's
    # PlacementGroupCleaner looks its cluster up without one, and with a second Ray on the machine (two
    # searches, a test beside a search) it finds both, fails, and the stopped trials' CPUs leak.
    gcs_port = free_port()
    # The workers' variables are inherited (the raylet starts with them and its workers with the raylet's),
    # not given as the job's runtime_env: a job with a runtime env cannot use the workers the raylet starts
    # ahead, so every actor of a search (trial functions, pool, Ray Train's controller and helpers, the worker
    # groups) paid a process start of its own.
    inherited = {**WORKER_ENV, **EMBEDDED_ENV, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
                 "RAY_GCS_SERVER_PORT": str(gcs_port)}
    with cluster_environment(inherited):
        ray.init(
            # "local": a new cluster even where `ray start` left one on this machine (a bare ray.init
            # would join it, and then refuse num_cpus)
            address="local",
            num_cpus=logical_cpus(concurrency, cpus_per_trial),
            # The dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner needs to free
            # the CPUs of a trial that ASHA stopped; without it those CPUs leak until no trial can start.
            # Bound to loopback so nothing listens beyond this machine.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            configure_logging=True,
            logging_level="WARNING",
            log_to_driver=True,
        )
    route_worker_output()
    _note_session_dir()
    return True


def _note_session_dir() -> None:
    """Says in the driver's log (the run's search.log, while a search runs) where Ray keeps its own logs."""
    import logging

    logging.getLogger(__name__).info(f"Ray's own logs, each worker's stdout/stderr included: {session_dir()} "
                                     f"(on each node of a cluster: its /tmp/ray/session_latest/logs)")


def route_worker_output() -> bool:
    """Hand the workers' forwarded stdout/stderr to `worker_output_sink` (while one is set) instead of Ray's
    printing: each batch whole, not deduplicated ("[repeated 2x across cluster]") and uncoloured. Ray still keeps
    every worker's output in its session directory (`session_dir()`). False when this driver gets no forwarded
    output (`log_to_driver=False`). Safe to call again."""
    import logging

    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import filter_autoscaler_events
    except ImportError:   # another Ray: its own printing stays
        return False
    printing = next((handler for name, handler in list(dispatcher.handlers) if name == RAY_PRINT_LOGS), None)
    if printing is None:
        return False
    if getattr(printing, "routed", False):
        return True

    def forward(data: dict) -> None:
        sink = worker_output_sink
        if sink is None:
            printing(data)
            return
        if data.get("pid") == "autoscaler":   # its status table every few seconds: its events only, as Ray prints
            try:
                data = {**data, "lines": list(filter_autoscaler_events(data.get("lines") or []))}
            except Exception:   # Ray's filter could not tell (no GCS client): the autoscaler's own log has them
                return
            if not data["lines"]:
                return
        try:
            sink(data)
        except Exception:   # the sink's trouble (a closed file) must not stop Ray's log thread
            logging.getLogger(__name__).debug("worker output sink failed", exc_info=True)
            printing(data)

    forward.routed = True
    # the same name: ray.shutdown removes it as it would Ray's own
    dispatcher.remove_handler(RAY_PRINT_LOGS)
    dispatcher.add_handler(RAY_PRINT_LOGS, forward)
    return True


def session_dir() -> Optional[str]:
    """The logs directory of this driver's Ray session (each worker's worker-*.out / .err, the raylet's, the
    GCS'), None when unknown."""
    try:
        from ray._private import worker

        return worker._global_node.get_logs_dir_path()
    except Exception:   # not connected, or Ray moved it
        return None


# Ray's switch for "a single machine, not a cluster node" (its name is historical: the default on macOS and
# Windows). Off, Ray takes 127.0.0.1 as the node's address, and every server it starts (GCS, raylet, workers'
# gRPC, dashboard agent, runtime-env agent) binds to loopback only. On (the Linux default), ray.init turns
# `_node_ip_address="127.0.0.1"` into the machine's routable address and those servers listen on every
# interface (seen: `::` and 0.0.0.0), reachable from the network.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def cluster_environment(variables: dict):
    """While the embedded cluster starts: `variables` and LOOPBACK_ENV in the environment, which every process
    it starts (GCS, raylet, the raylet's workers) keeps: all its servers bind to loopback.

    Ray reads the loopback switch once, when `ray` is first imported (here it usually is already, by Ray
    Tune), so the imported constant is set too; all are put back afterwards, so that the driver's own
    environment is unchanged and a later `ray.init(address=...)` to a real cluster in this process finds its
    routable address as usual."""
    from ray._private import ray_constants

    variables = {**variables, **LOOPBACK_ENV}
    saved_env = {key: os.environ.get(key) for key in variables}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(variables)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_not_set_by_job() -> dict:
    """WORKER_ENV less the variables a `ray job submit` runtime env already sets: Ray refuses to merge a
    driver's runtime env into the job's when both name the same variable."""
    import json

    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    job_env = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {key: value for key, value in WORKER_ENV.items() if key not in job_env}


def shutdown(started_here: bool) -> None:
    import ray

    if started_here and ray.is_initialized():
        ray.shutdown()
