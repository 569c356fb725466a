"""Progress a person can follow in a terminal and in `ray job logs`: one line per finished trial, and a
tally (done / running / pruned / failed, best so far, elapsed and estimated time left) at least every
`HEARTBEAT_S` seconds while trials run, so a long trial never looks like a hang. Also the driver's other
Tune callback, CancelEndedTrials (kept here, out of search/run/pool.py: the pool's process then starts without
importing Ray Tune, and the first worker group starts sooner)."""
from __future__ import annotations

import time
from typing import Sequence, Union

from ray.tune import Callback

from search.store.keys import FAIL_REASON_KEY, ROUNDS_TOTAL_KEY, TRIAL_NUMBER_KEY
from search.numbers import is_number, show_number

HEARTBEAT_S = 60.0


class ProgressLines(Callback):
    """`metric`/`mode`: one objective, or lists of several (then "best" is the first objective's best)."""

    def __init__(self, metric: Union[str, Sequence[str]], mode: Union[str, Sequence[str]], total: int,
                 heartbeat_s: float = HEARTBEAT_S):
        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        self.mode = mode if isinstance(mode, str) else mode[0]
        self.total = total
        self.heartbeat_s = heartbeat_s
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        self.running = 0
        self.best = None
        self.started = self.last_line = time.time()

    def on_step_end(self, iteration, trials, **info):
        self.running = sum(1 for t in trials if t.status == "RUNNING")
        if self.running and time.time() - self.last_line >= self.heartbeat_s:
            self._print("")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get(FAIL_REASON_KEY):   # a failed trial reports its reason and ends (search/run/trial.py)
            self.on_trial_error(iteration, trials, trial)
            return
        value = result.get(self.metrics[0])
        finished = result.get("round") is not None and result.get("round") >= result.get(ROUNDS_TOTAL_KEY, 0)
        outcome = "complete" if finished else "pruned"
        self.counts[outcome] += 1
        if outcome == "complete" and is_number(value):
            if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
                self.best = value
        values = ", ".join(f"{name}={show_number(result.get(name))}" for name in self.metrics)
        self._trial_line(trials, trial, f"{outcome} after round {result.get('round')}: {values}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.counts["failed"] += 1
        reason = (trial.last_result or {}).get(FAIL_REASON_KEY, "see the Ray trial logs")
        self._trial_line(trials, trial, f"FAILED: {reason}")

    def _trial_line(self, trials, trial, what: str) -> None:
        # the finished trial is no longer counted as running
        self.running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        self._print(f"trial {trial.config.get(TRIAL_NUMBER_KEY, '?')} {what} | ")

    def _print(self, head: str) -> None:
        self.last_line = now = time.time()
        print(f"[peft-search] {head}{self.tally(now)}", flush=True)

    def tally(self, now: float) -> str:
        done = sum(self.counts.values())
        elapsed = now - self.started
        left = f"~{elapsed / done * (self.total - done):.0f}s left" if done else "time left unknown yet"
        kinds = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
        return (f"{done}/{self.total} done{f' ({kinds})' if kinds else ''}, {self.running} running, "
                f"best {self.metrics[0]}={show_number(self.best)}, {elapsed:.0f}s elapsed, {left}")


class CancelEndedTrials(Callback):
    """A trial Tune ended is cancelled in the pool too, so that no group waits on it (the trial function
    does this itself, unless its process was killed)."""

    def __init__(self, pool):
        self.pool = pool

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.pool.cancel.remote(trial.config[TRIAL_NUMBER_KEY])

    on_trial_error = on_trial_complete
