"""One line per finished trial and a running tally, readable in a terminal and in `ray job logs`."""
from __future__ import annotations

import math
import time
from typing import Sequence, Union

from ray.tune import Callback

from search.searcher import FAIL_REASON_KEY, ROUNDS_TOTAL_KEY, TRIAL_NUMBER_KEY


class ProgressLines(Callback):
    """`metric`/`mode`: one objective, or lists of several (then "best" is the first objective's best)."""

    def __init__(self, metric: Union[str, Sequence[str]], mode: Union[str, Sequence[str]], total: int):
        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        self.mode = mode if isinstance(mode, str) else mode[0]
        self.total = total
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        self.best = None
        self.started = time.time()

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        value = result.get(self.metrics[0])
        finished = result.get("round") is not None and result.get("round") >= result.get(ROUNDS_TOTAL_KEY, 0)
        outcome = "complete" if finished else "pruned"
        self.counts[outcome] += 1
        if outcome == "complete" and isinstance(value, (int, float)) and math.isfinite(value):
            if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
                self.best = value
        values = ", ".join(f"{name}={_fmt(result.get(name))}" for name in self.metrics)
        self._line(trial, f"{outcome} after round {result.get('round')}: {values}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.counts["failed"] += 1
        reason = (trial.last_result or {}).get(FAIL_REASON_KEY, "see the Ray trial logs")
        self._line(trial, f"FAILED: {reason}")

    def _line(self, trial, what: str) -> None:
        done = sum(self.counts.values())
        elapsed = time.time() - self.started
        eta = elapsed / done * (self.total - done) if done else float("nan")
        tally = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
        print(f"[peft-search] trial {trial.config.get(TRIAL_NUMBER_KEY, '?')} {what} | {done}/{self.total} done "
              f"({tally}), best {self.metrics[0]}={_fmt(self.best)}, {elapsed:.0f}s elapsed, ~{eta:.0f}s left",
              flush=True)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
