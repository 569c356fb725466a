"""What a search shows on the terminal, and where everything else goes.

The terminal gets the product's own lines only (`[peft-search] ...`): one per finished trial, the product's
log messages, and, on a terminal (a TTY), one status line at the bottom rewritten in place (search/run/progress.py).
Not a TTY (a pipe, a file, `ray job logs`), the status line is left out and the lines are plain.

Everything else a search prints goes to RUN_DIR/logs/search.log (LOG_FILE), while `capture` is on:

- Python warnings and the records of every library logger (Optuna, Ray, Ray Tune, transformers, ...);
- whatever the driver's libraries print to sys.stdout / sys.stderr (Ray Tune's experiment box, tqdm bars);
- the stdout/stderr of the Ray worker processes (trial functions, Ray Train controllers and workers: the
  transformers load report, DeepSpeed's and bitsandbytes' notices, tracebacks) that Ray forwards to the driver,
  one line each, prefixed with the time and the process as Ray names it: `12:00:01 (RayTrainWorker pid=42) ...`
  (cluster/local.py hands them here, none deduplicated). Ray keeps them in its session directory as well
  (`/tmp/ray/session_*/logs/worker-*.out|err` on each node; the log's first lines name the driver's).

When a trial fails, the lines the log got since the trial started are shown under its line (TAIL_LINES of
them, `show_tail`); when the search itself stops on an error, the log's last lines and its path.
Lines a worker prints that are the product's own (`[peft-search] ...`, or `trial N: ...` as the trial function
says it retries a trial) are shown on the terminal too.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
import traceback
from typing import Callable, List, Optional, Tuple, Type

LOG_DIR = "logs"
LOG_FILE = os.path.join(LOG_DIR, "search.log")   # relative to the run directory
PREFIX = "[peft-search] "
TAIL_LINES = 20
TAIL_READ_BYTES = 256 * 1024   # how far back from the end the tail is looked for
CLEAR_LINE = "\r\x1b[2K"       # carriage return, then erase the whole line (ANSI EL2)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers whose records are the product's own: shown on the terminal (and kept in the log)
PRODUCT_LOGGERS = ("peft_search", "search")
# Worker lines that are the product's own: the trial function's retry notice, the pool's per-trial warnings
_PRODUCT_WORKER_LINE = re.compile(r"^(?:\[peft-search\] |trial \d+: )")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")   # colours and cursor moves: the log is read in an editor too


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):   # closed, or not a real stream
        return False


class Console:
    """The product's terminal. `line` prints a line; on a TTY, `status` keeps one line at the bottom that is
    rewritten in place (cleared before each line and drawn again after it). Thread-safe: the product's log
    records and the workers' forwarded lines come from other threads than Ray Tune's callbacks."""

    def __init__(self, out=None, err=None, tty: Optional[bool] = None, width: Optional[int] = None):
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.tty = _isatty(self.out) if tty is None else tty
        self._width = width
        self._status = ""        # the status text (TTY only)
        self._shown = False      # the status line is on the screen now
        self._lock = threading.RLock()

    def line(self, text: str, err: bool = False, status: Optional[str] = None) -> None:
        """`text` as a line (on stderr with `err`), above the status line, which shows `status` from now on
        where given."""
        with self._lock:
            self._erase()
            stream = self.err if err else self.out
            stream.write(text + "\n")
            stream.flush()
            if status is not None and self.tty:
                self._status = status
            self._draw()

    def status(self, text: str) -> None:
        """Show `text` as the status line (on a TTY; elsewhere nothing: the lines are all there is)."""
        if not self.tty:
            return
        with self._lock:
            self._status = text
            self._erase()
            self._draw()

    def end_status(self) -> None:
        """Take the status line off the screen; the next output starts on a clean line."""
        with self._lock:
            self._erase()
            self._status = ""

    def _erase(self) -> None:
        if self._shown:
            self.out.write(CLEAR_LINE)
            self.out.flush()
            self._shown = False

    def _draw(self) -> None:
        if self.tty and self._status:
            # one screen line at most: a wrapped line could not be rewritten in place
            self.out.write(self._status[:max(10, self.width() - 1)])
            self.out.flush()
            self._shown = True

    def width(self) -> int:
        if self._width:
            return self._width
        try:
            columns = os.get_terminal_size(self.out.fileno()).columns
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            columns = 0
        return columns or 120   # 0: a pseudo-terminal that was given no size (`script`, some CI runners)


class RunLog:
    """RUN_DIR/logs/search.log, appended to (a resumed search adds to it); thread-safe."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOG_FILE)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8", errors="replace", buffering=1)
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            if self._handle.closed:
                return 0
            self._handle.write(text)
            return len(text)

    def flush(self) -> None:
        with self._lock:
            if not self._handle.closed:
                self._handle.flush()

    def fileno(self) -> int:
        return self._handle.fileno()

    def size(self) -> int:
        """The log's length in bytes now (where the lines written from now on begin)."""
        self.flush()
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def close(self) -> None:
        with self._lock:
            self._handle.close()

    def worker_lines(self, data: dict) -> List[str]:
        """Write one batch of a Ray worker's forwarded stdout/stderr (cluster/local.py's sink); returns the
        lines among them that are the product's own, for the terminal."""
        who = data.get("actor_name") or data.get("task_name") or ""
        where = f"{who} pid={data.get('pid')}".strip()
        if data.get("ip") and data.get("ip") != data.get("localhost"):
            where += f", ip={data.get('ip')}"
        stamp = time.strftime("%H:%M:%S")
        lines = [_as_shown(line) for line in data.get("lines") or []]
        self.write("".join(f"{stamp} ({where}) {line}\n" for line in lines))
        return [line for line in lines if _PRODUCT_WORKER_LINE.match(line)]

    def tail(self, since: int = 0, lines: int = TAIL_LINES, until: Optional[int] = None) -> List[str]:
        """The last `lines` lines written from byte `since` (to byte `until`), the product's own lines left out."""
        self.flush()
        try:
            with open(self.path, "rb") as handle:
                end = handle.seek(0, io.SEEK_END) if until is None else until
                start = max(since, end - TAIL_READ_BYTES)
                handle.seek(start)
                text = handle.read(max(0, end - start)).decode("utf-8", errors="replace")
        except OSError:
            return []
        found = text.split("\n")
        if start > since and found:   # read from the middle of a line
            found = found[1:]
        found = [line.rstrip() for line in found if line.strip() and not line.startswith(PREFIX)]
        return found[-lines:]


def _as_shown(line: str) -> str:
    """A worker's line as a terminal would have left it: no colours or cursor moves, and of a line a progress bar
    rewrote with carriage returns, its last state."""
    parts = [part for part in _ANSI.sub("", line).split("\r") if part.strip()]
    return parts[-1].rstrip() if parts else ""


class _LogStream(io.TextIOBase):
    """sys.stdout / sys.stderr while a search runs: what libraries print goes into the run's log."""

    def __init__(self, log: RunLog, name: str):
        super().__init__()
        self._log, self._name = log, name

    @property
    def encoding(self):
        return "utf-8"

    @property
    def name(self):
        return self._name

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        if not isinstance(text, str):
            text = str(text)
        return self._log.write(text)

    def flush(self) -> None:
        self._log.flush()

    def fileno(self) -> int:   # e.g. faulthandler, or a subprocess handed sys.stdout: the log file itself
        return self._log.fileno()

    def isatty(self) -> bool:
        return False


class _ConsoleHandler(logging.Handler):
    """The product's log records on the terminal: `[peft-search] message`, warnings and errors on stderr."""

    def __init__(self, console: Console):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                self.console.line(f"{PREFIX}{record.levelname.lower()}: {message}", err=True)
            else:
                self.console.line(f"{PREFIX}{message}")
        except Exception:   # never let showing a message break the search
            self.handleError(record)


_current: Optional[Tuple[Console, Optional[RunLog]]] = None
_failure_shown: Optional[Tuple[BaseException, str]] = None


def current() -> Console:
    """The console of the search running in this process, else one on sys.stdout / sys.stderr."""
    return _current[0] if _current else Console()


def current_log() -> Optional[RunLog]:
    """The log of the search running in this process, None when no `capture` is on."""
    return _current[1] if _current else None


def failure_log(exc: BaseException) -> Optional[str]:
    """The log's path when `capture` showed `exc` (its tail and the path) on the terminal already."""
    if _failure_shown is not None and _failure_shown[0] is exc:
        return _failure_shown[1]
    return None


def show_tail(console: Console, log: RunLog, title: str, since: int = 0, lines: int = TAIL_LINES,
              err: bool = False, until: Optional[int] = None) -> None:
    """`title`, then the last `lines` lines of `log` written from byte `since` (to `until`), indented, and the
    log's path."""
    found = log.tail(since, lines, until)
    if not found:
        console.line(f"{PREFIX}{title}: no new lines in {log.path}", err=err)
        return
    text = "\n".join([f"{PREFIX}{title}: the last {len(found)} lines of {log.path}:"] +
                     [f"    {line}" for line in found])
    console.line(text, err=err)


@contextlib.contextmanager
def capture(run_dir: str, quiet: Tuple[Type[BaseException], ...] = (), console: Optional[Console] = None):
    """While on: the terminal shows the product's lines (`console`, default the terminal as it is now) and
    everything else goes to RUN_DIR/logs/search.log (the module's docstring says what). An error that ends the
    block is written to the log with its traceback, and the log's tail and path are shown, except for KeyboardInterrupt
    and the `quiet` kinds (input problems the CLI reports in one line); the error goes on as it was."""
    global _current, _failure_shown
    from cluster import local

    console = console or Console()
    log = RunLog(run_dir)
    out, err = _LogStream(log, "<stdout>"), _LogStream(log, "<stderr>")
    root = logging.getLogger()
    file_handler = logging.StreamHandler(out)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    file_handler.setLevel(logging.INFO)
    console_handler = _ConsoleHandler(console)
    product = [logging.getLogger(name) for name in PRODUCT_LOGGERS]
    saved = dict(root_handlers=root.handlers[:], root_level=root.level, stdout=sys.stdout, stderr=sys.stderr,
                 current=_current, sink=local.worker_output_sink, levels=[logger.level for logger in product],
                 warnings_captured=logging._warnings_showwarning is not None)   # type: ignore[attr-defined]
    log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} peft-search (pid {os.getpid()}): "
              f"{' '.join(sys.argv)}\n")
    console.line(f"{PREFIX}run directory {run_dir}; library and worker output: {log.path}")
    moved = _move_terminal_handlers({id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}, out)
    root.handlers = [file_handler]
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for logger in product:
        logger.addHandler(console_handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    sys.stdout, sys.stderr = out, err
    _current = (console, log)
    local.worker_output_sink = _worker_sink(console, log)
    console.status(f"{PREFIX}starting")
    try:
        yield console
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit, *quiet)):
            log.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            show_tail(console, log, f"the search stopped ({type(exc).__name__})", err=True)
            _failure_shown = (exc, log.path)
        raise
    finally:
        console.end_status()
        local.worker_output_sink = saved["sink"]
        _current = saved["current"]
        sys.stdout, sys.stderr = saved["stdout"], saved["stderr"]
        if not saved["warnings_captured"]:
            logging.captureWarnings(False)
        for logger, level in zip(product, saved["levels"]):
            logger.removeHandler(console_handler)
            logger.setLevel(level)
        root.handlers = saved["root_handlers"]
        root.setLevel(saved["root_level"])
        for handler, stream in moved:
            handler.setStream(stream)
        log.close()


def _worker_sink(console: Console, log: RunLog) -> Callable[[dict], None]:
    def sink(data: dict) -> None:
        for line in log.worker_lines(data):
            console.line(line if line.startswith(PREFIX) else f"{PREFIX}{line}")
    return sink


def _move_terminal_handlers(terminal_ids: set, to) -> List[Tuple[logging.StreamHandler, object]]:
    """Point every library's log handler that writes to the terminal (Optuna's, transformers', ...) at `to`;
    returns (handler, its stream) to put back. The root logger's are replaced, not moved."""
    moved = []
    for logger in list(logging.root.manager.loggerDict.values()):
        for handler in list(getattr(logger, "handlers", ())):
            # _StderrHandler (logging's last resort, Ray's PlainRayHandler) writes to sys.stderr as it is then
            if (not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler)
                    or isinstance(handler, logging._StderrHandler)):   # type: ignore[attr-defined]
                continue
            if id(handler.stream) in terminal_ids:
                moved.append((handler, handler.setStream(to)))
    return moved

