"""Helpers for the tests that lose nodes (tests/cluster/test_multinode.py, tests/chaos/test_nodes.py): a real
multi-node Ray cluster on this machine, searches driven against it by `peft-search` in a subprocess, and reads
of the run directory's Optuna study.

The cluster is `ray.cluster_utils.Cluster`: a head and worker nodes, each with its own raylet, object store and
node id, all on 127.0.0.1; `lose` kills a node's processes at once, as a crashed machine goes. Logical CPUs
are more than the cores (see cluster/local.py for why a trial's group needs the headroom)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import yaml

from cluster.local import EMBEDDED_ENV, WORKER_ENV, cluster_environment

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


class LocalCluster:
    """Head and worker nodes of one Ray cluster, started here; `shutdown` stops whatever is left of them."""

    def __init__(self, head_cpus: int, worker_cpus: int, workers: int = 1):
        from ray._private.utils import read_ray_address
        from ray.cluster_utils import Cluster

        self.worker_cpus = worker_cpus
        # Ray records the head's address for a bare `ray.init()` on this machine; put back as found at shutdown
        self.address_before = read_ray_address()
        # short: Ray's socket paths have a length limit
        self.temp_dir = tempfile.mkdtemp(prefix="raym", dir="/tmp")
        with cluster_environment({**WORKER_ENV, **EMBEDDED_ENV}):   # loopback only, offline workers
            self.cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
                "num_cpus": head_cpus, "node_ip_address": "127.0.0.1", "temp_dir": self.temp_dir,
                "include_dashboard": False})
        self.head = self.cluster.head_node
        self.address = self.cluster.address
        self.workers = []
        for _ in range(workers):
            self.add_worker()

    def add_worker(self):
        """A new worker node (a machine joining the cluster)."""
        with cluster_environment({**WORKER_ENV, **EMBEDDED_ENV}):
            node = self.cluster.add_node(num_cpus=self.worker_cpus, node_ip_address="127.0.0.1")
        self.workers.append(node)
        return node

    def lose(self, node) -> None:
        """Kill every process of `node` at once (no graceful stop), as a crashed or unplugged machine."""
        self.cluster.remove_node(node, allow_graceful=False)
        if node in self.workers:
            self.workers.remove(node)
        if node is self.head:
            self.head = None
            # Starting the head made its GCS client this process's internal KV client (Ray's global). The next
            # library call that reads it (Ray Tune's searcher, in a later test) would wait for the dead GCS and
            # then end this test process (exit 1, after 60 s): the client goes with its head.
            import ray.experimental.internal_kv as internal_kv

            internal_kv._internal_kv_reset()

    def shutdown(self) -> None:
        for node in list(self.workers):
            self.lose(node)
        if self.head is not None:
            self.lose(self.head)
        self._put_back_recorded_address()
        subprocess.Popen(["rm", "-rf", self.temp_dir], start_new_session=True)


    def _put_back_recorded_address(self) -> None:
        from ray._common.utils import get_ray_address_file, reset_ray_address
        from ray._private.utils import read_ray_address

        if read_ray_address() != self.address:   # someone else's since
            return
        if self.address_before is None:
            reset_ray_address()
        else:
            with open(get_ray_address_file(None), "w") as handle:
                handle.write(self.address_before)


def driver(args, log_path) -> subprocess.Popen:
    """`peft-search ARGS` in a process of its own (a killed driver takes nothing else with it)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # keeps 127.0.0.1 as the driver's node address
    log = open(log_path, "a")
    return subprocess.Popen([sys.executable, "-m", "search", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=REPO, start_new_session=True)


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def write_spec(directory, model, train, name, trials, concurrency, cpus_per_worker, epochs=3, max_failures=2,
               learning_rates=None) -> str:
    spec = {
        "name": name,
        "model": {"name_or_path": model, "task": "sequence-classification"},
        "data": {"train": train, "text_field": "text", "label_field": "label", "max_length": 32},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        "space": {"r": [2, 4, 8], "learning_rate": learning_rates or {"low": 1e-3, "high": 1e-2, "log": True}},
        "training": {"epochs": epochs, "batch_size": 16},
        "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"algorithm": "tpe", "trials": trials, "concurrency": concurrency, "scheduler": "none", "seed": 5,
                   "max_failures": max_failures},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": cpus_per_worker},
        "tracking": {"wandb": "disabled"},
    }
    path = os.path.join(str(directory), f"{name}.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(spec, handle)
    return path


def trials(run_dir):
    """The run directory's Optuna trials, [] before the study exists."""
    import optuna

    path = os.path.join(str(run_dir), "study.sqlite3")
    if not os.path.exists(path):
        return []
    try:
        return optuna.load_study(study_name="peft-search", storage=f"sqlite:///{path}").get_trials(deepcopy=False)
    except Exception:   # not created yet
        return []


def checkpointed_rounds(run_dir):
    """trial number -> its newest checkpointed round."""
    rounds = {}
    base = os.path.join(str(run_dir), "trials")
    for number in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, number, "checkpoint", "latest")) as handle:
                rounds[int(number)] = int(handle.read().strip().split("-")[-1])
        except (OSError, ValueError):
            continue   # none yet, or being written
    return rounds


def wait_for(condition, process, timeout, what):
    """Poll `condition` until true; fails if the driver ends first or `timeout` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        assert process.poll() is None, f"the driver ended before {what}"
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout} s")
