"""Processes left behind by an embedded Ray whose driver was killed.

SIGKILL gives the driver no chance to stop the Ray it started: its GCS and raylet go, but workers
(idle ones, a trial's workers between tasks) were seen still alive minutes later, holding memory and,
for a trial's workers, possibly still writing into the run directory. The driver records its embedded
cluster's GCS port in the run directory; every process of that cluster carries it in its environment
(RAY_GCS_SERVER_PORT, set while Ray starts, see cluster/local.py), which is how a resumed search finds
and stops them before it starts trials of its own.
"""
from __future__ import annotations

import os
import signal
from typing import List, Optional

PORT_FILE = "embedded_ray_gcs_port"


def record(run_dir: str, gcs_address: str) -> None:
    with open(os.path.join(run_dir, PORT_FILE), "w", encoding="utf-8") as handle:
        handle.write(gcs_address.rsplit(":", 1)[-1] + "\n")


def forget(run_dir: str) -> None:
    """The driver stopped its embedded Ray itself: nothing is left to find."""
    try:
        os.remove(os.path.join(run_dir, PORT_FILE))
    except OSError:
        pass


def recorded_port(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, PORT_FILE), encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def processes_of(gcs_port: str, name: str = "") -> List[int]:
    """PIDs of this machine's processes started for the embedded cluster on `gcs_port` (whose title holds `name`)."""
    import psutil

    marker = f"RAY_GCS_SERVER_PORT={gcs_port}"
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid == os.getpid() or name not in " ".join(process.info["cmdline"] or []):
                continue
            with open(f"/proc/{process.pid}/environ", "rb") as handle:
                if marker.encode() in handle.read().split(b"\0"):
                    found.append(process.pid)
        except (OSError, psutil.Error):
            continue   # gone meanwhile, or not ours to read
    return found


def stop_leftovers(run_dir: str) -> int:
    """SIGKILL what is left of the embedded Ray of this run directory's previous driver; returns how many."""
    port = recorded_port(run_dir)
    if port is None:
        return 0
    pids = processes_of(port)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    forget(run_dir)
    return len(pids)
