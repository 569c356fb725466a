"""A cap on a trial's host memory: past it the trial fails with an out-of-memory reason.

Without a cap, a trial that outgrows the machine's memory pushes it into swap (every trial on the node crawls)
or wakes the kernel's OOM killer, which may pick any process: a worker (the trial is retried and grows again),
the driver or Ray itself. With `resources.memory_per_worker_gb`, a watchdog thread reads this process's
resident memory every few milliseconds and, past the cap, raises HostMemoryExceeded (a MemoryError) in the
training thread at its next Python instruction; the recipe turns it into `TrialFailed("out of memory ...")`,
which the search records as the trial's reason and never retries. The block also fails as it starts if the
worker is over the cap already, and as it ends if it went over at any look (however it handled the exceptions).
A single allocation larger than the headroom left still lands before the exception: the cap bounds growth
across steps, not inside one operation.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Iterator, List, Optional

import psutil

CHECK_INTERVAL_S = 0.01
REFIRE_INTERVAL_S = 0.1


class HostMemoryExceeded(MemoryError):
    """Raised in the training thread; a subclass made per breach carries the figures (see _breach)."""

    detail = "host memory over the cap"

    def __str__(self) -> str:
        return self.detail


def _breach(rss_mb: float, limit_mb: float) -> type:
    # An exception raised in another thread is given as a class (CPython instantiates it without
    # arguments), so the message travels as a class attribute.
    detail = (f"host memory: this worker's resident memory reached {rss_mb:.0f} MiB, over its "
              f"{limit_mb:.0f} MiB cap (resources.memory_per_worker_gb)")
    return type("HostMemoryExceeded", (HostMemoryExceeded,), {"detail": detail})


@contextlib.contextmanager
def host_memory_cap(limit_mb: Optional[float]) -> Iterator[None]:
    """While the block runs, raise HostMemoryExceeded in this thread once the process's RSS passes `limit_mb`.

    None: no cap (nothing is started)."""
    if limit_mb is None:
        yield
        return
    target = threading.get_ident()
    process = psutil.Process()
    done = threading.Event()
    breaches: List[type] = []

    def over_cap() -> Optional[type]:
        rss_mb = process.memory_info().rss / 2 ** 20
        return _breach(rss_mb, limit_mb) if rss_mb > limit_mb else None

    def watch() -> None:
        interval = CHECK_INTERVAL_S
        while not done.wait(interval):
            breach = over_cap()
            if breach is not None:
                breaches.append(breach)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(breach))
                # raised again while still over: the first one may land inside a library's `except Exception`
                interval = REFIRE_INTERVAL_S

    breach = over_cap()   # already over as it starts: fail now, not at the watcher's first look
    if breach is not None:
        raise breach()
    watcher = threading.Thread(target=watch, name="host-memory-cap", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        # a breach the block outran (it ended first) is not raised later in unrelated code...
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
    # ...but here: the block went over the cap, even if every exception the watcher raised was swallowed
    # or came too late (on a loaded machine a short trial under a small cap could otherwise complete)
    if breaches:
        raise breaches[-1]()
