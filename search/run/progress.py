"""Progress a person can follow in a terminal and in `ray job logs`: one line per finished trial with a tally
(done / running / pruned / failed, best so far, elapsed and estimated time left). On a terminal (a TTY) the
tally is also a status line at the bottom, rewritten in place every STATUS_S seconds; elsewhere (a pipe, a file,
`ray job logs`) the tally is repeated as a plain line at least every `HEARTBEAT_S` seconds while trials run, so a
long trial never looks like a hang (search/run/console.py draws both). A failed trial's line is followed by the
lines the search's log got since the trial started (for the first MAX_TAILS failed trials). Also the driver's
other Tune callback, CancelEndedTrials (kept here, out of search/run/pool.py: the pool's process then starts
without importing Ray Tune, and the first worker group starts sooner)."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ray.tune import Callback

from search.numbers import is_number, show_number
from search.run import console as terminal
from search.store.keys import FAIL_REASON_KEY, ROUNDS_TOTAL_KEY, TRIAL_NUMBER_KEY

HEARTBEAT_S = 60.0
STATUS_S = 1.0       # the status line's refresh on a TTY
TAIL_WAIT_S = 2.0    # a failed trial's log tail waits this long for the workers' last lines (Ray forwards them late)
MAX_TAILS = 3        # failed trials whose log tail is shown; the terminal stays a view of the search when many fail


class ProgressLines(Callback):
    """`metric`/`mode`: one objective, or lists of several (then "best" is the first objective's best)."""

    def __init__(self, metric: Union[str, Sequence[str]], mode: Union[str, Sequence[str]], total: int,
                 heartbeat_s: float = HEARTBEAT_S, console: Optional[terminal.Console] = None,
                 log: Optional[terminal.RunLog] = None, tail_wait_s: float = TAIL_WAIT_S,
                 edges: Optional[Callable[[dict], list]] = None):
        """`console`: where the lines go (default: the running search's, else sys.stdout); `log`: the log whose
        tail a failed trial shows (default: the running search's, else none); `edges`: a best trial's params ->
        the range edges they sit at (search/refine/edges.SpaceEdges), flagged as each new best comes in."""
        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        self.mode = mode if isinstance(mode, str) else mode[0]
        self.total = total
        self.heartbeat_s = heartbeat_s
        self.console = console or terminal.current()
        self.log = log if log is not None else terminal.current_log()
        self.tail_wait_s = tail_wait_s
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        self.running = 0
        self.best = None
        self.started = self.last_line = self.last_status = time.time()
        self.log_at: Dict[int, int] = {}                  # trial number -> the log's size when it started
        self.shown_to = 0                                 # the log's size when the last tail was shown
        self.tails_left = MAX_TAILS
        self.tails: List[Tuple[float, object, int]] = []  # failed trials' tails to show: (due, number, from)
        self.edges = edges
        self.edges_shown: set = set()                     # (setting, side): each edge flagged once

    def __getstate__(self):   # Tune pickles its callbacks (tuner.pkl): the terminal and the log file stay here
        return {**self.__dict__, "console": None, "log": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.console, self.log = terminal.current(), terminal.current_log()

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.log is not None:
            self.log_at[self._number(trial)] = self.log.size()

    def on_step_end(self, iteration, trials, **info):
        self.running = sum(1 for t in trials if t.status == "RUNNING")
        now = time.time()
        self._show_tails(now)
        if self.console.tty:
            if now - self.last_status >= STATUS_S:
                self._status(now)
        elif self.running and now - self.last_line >= self.heartbeat_s:
            self._print("")

    def on_experiment_end(self, trials, **info):
        self._show_tails(float("inf"))
        self.console.end_status()

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get(FAIL_REASON_KEY):   # a failed trial reports its reason and ends (search/run/trial.py)
            self.on_trial_error(iteration, trials, trial)
            return
        value = result.get(self.metrics[0])
        finished = result.get("round") is not None and result.get("round") >= result.get(ROUNDS_TOTAL_KEY, 0)
        outcome = "complete" if finished else "pruned"
        self.counts[outcome] += 1
        new_best = outcome == "complete" and is_number(value) and (
            self.best is None or (value > self.best if self.mode == "max" else value < self.best))
        if new_best:
            self.best = value
        values = ", ".join(f"{name}={show_number(result.get(name))}" for name in self.metrics)
        self._trial_line(trials, trial, f"{outcome} after round {result.get('round')}: {values}")
        if new_best and self.edges is not None:
            self._flag_edges(trial)

    def _flag_edges(self, trial) -> None:
        params = {k: v for k, v in trial.config.items() if k != TRIAL_NUMBER_KEY}
        for edge in self.edges(params):
            if (edge.param, edge.side) not in self.edges_shown:
                self.edges_shown.add((edge.param, edge.side))
                self.console.line(f"{terminal.PREFIX}range edge: {edge.text()} (next_spec.yaml will)",
                                  status=f"{terminal.PREFIX}{self.tally(time.time())}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.counts["failed"] += 1
        reason = (trial.last_result or {}).get(FAIL_REASON_KEY, "see the Ray trial logs")
        number = self._number(trial)
        since = self.log_at.get(number, 0)
        self._trial_line(trials, trial, f"FAILED: {reason}")
        if self.log is not None and self.tails_left > 0:
            self.tails_left -= 1
            self.tails.append((time.time() + self.tail_wait_s, number, since))
            self._show_tails(time.time())

    @staticmethod
    def _number(trial):
        return trial.config.get(TRIAL_NUMBER_KEY, "?")

    def _trial_line(self, trials, trial, what: str) -> None:
        # the finished trial is no longer counted as running
        self.running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        self.log_at.pop(self._number(trial), None)
        self._print(f"trial {self._number(trial)} {what} | ")

    def _show_tails(self, now: float) -> None:
        """The log's lines since each failed trial started, once TAIL_WAIT_S have passed since it failed; lines an
        earlier tail showed are not shown again (trials failing together)."""
        while self.tails and self.tails[0][0] <= now:
            _, number, since = self.tails.pop(0)
            end = self.log.size()
            more = "" if self.tails_left or self.tails else " (the next failed trials' lines are in the log only)"
            terminal.show_tail(self.console, self.log, f"trial {number} failed{more}", since=max(since, self.shown_to),
                               until=end)
            self.shown_to = end

    def _print(self, head: str) -> None:
        self.last_line = self.last_status = now = time.time()
        tally = self.tally(now)
        self.console.line(f"{terminal.PREFIX}{head}{tally}", status=f"{terminal.PREFIX}{tally}")

    def _status(self, now: float) -> None:
        self.last_status = now
        self.console.status(f"{terminal.PREFIX}{self.tally(now)}")

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
