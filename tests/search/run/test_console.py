"""The terminal view and the run's log (search/run/console.py), and Ray's forwarded worker output routed into it
(cluster/local.py): a fake terminal stands in for the TTY, a fake batch for what Ray forwards."""
import io
import logging
import os
import sys
import warnings

import pytest

from cluster import local
from search.run import console
from search.run.console import CLEAR_LINE, Console, RunLog, capture


class Screen(io.StringIO):
    """A fake terminal: what was written, and what a terminal would show after \\r and erase-line."""

    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty

    def shown(self):
        lines = []
        for raw in self.getvalue().split("\n"):
            line = raw.rsplit(CLEAR_LINE, 1)[-1].rsplit("\r", 1)[-1]
            lines.append(line)
        return lines


def test_not_a_tty_gets_plain_lines_and_no_status():
    out = Screen(tty=False)
    view = Console(out, out)
    view.status("[peft-search] 1/4 done")
    view.line("[peft-search] trial 0 complete")
    view.end_status()
    assert out.getvalue() == "[peft-search] trial 0 complete\n"
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_tty_keeps_one_status_line_below_the_lines_and_rewrites_it_in_place():
    out = Screen(tty=True)
    view = Console(out, out, width=40)
    assert view.tty
    view.status("[peft-search] 0/4 done, 2 running")
    view.status("[peft-search] 0/4 done, 2 running, 5s elapsed")
    view.line("[peft-search] trial 0 complete")
    view.status("[peft-search] 1/4 done, 1 running, a status line longer than the terminal")
    assert out.shown() == ["[peft-search] trial 0 complete", "[peft-search] 1/4 done, 1 running, a st"]
    assert len(out.shown()[-1]) == 39   # never wraps: a wrapped line could not be rewritten
    view.end_status()
    assert out.getvalue().endswith(CLEAR_LINE) and out.shown()[-1] == ""


def test_error_lines_go_to_stderr_and_the_status_is_drawn_again_after_them():
    out, err = Screen(tty=True), io.StringIO()
    view = Console(out, err, width=80)
    view.status("[peft-search] 0/2 done")
    view.line("[peft-search] warning: something", err=True)
    assert err.getvalue() == "[peft-search] warning: something\n"
    assert out.getvalue() == "[peft-search] 0/2 done" + CLEAR_LINE + "[peft-search] 0/2 done"


def test_worker_lines_are_written_with_their_process_uncoloured_and_product_lines_picked(tmp_path):
    log = RunLog(str(tmp_path))
    picked = log.worker_lines({"pid": 42, "actor_name": "RayTrainWorker", "ip": "127.0.0.1",
                               "localhost": "127.0.0.1", "is_err": True,
                               "lines": ["\x1b[1mLOAD REPORT\x1b[0m", "trial 3: worker lost; retrying from its last "
                                         "checkpoint (1/2)", "[peft-search] own line",
                                         "Loading weights:   0%|  | 0/41\rLoading weights: 100%|##| 41/41\r"]})
    log.close()
    text = (tmp_path / "logs" / "search.log").read_text()
    assert "(RayTrainWorker pid=42) LOAD REPORT\n" in text and "\x1b" not in text and "\r" not in text
    assert "(RayTrainWorker pid=42) Loading weights: 100%|##| 41/41\n" in text   # as the terminal would show it
    assert picked == ["trial 3: worker lost; retrying from its last checkpoint (1/2)", "[peft-search] own line"]


def test_tail_is_the_last_lines_since_an_offset_without_the_products_own(tmp_path):
    log = RunLog(str(tmp_path))
    log.write("before the trial\n")
    since = log.size()
    log.write("".join(f"line {i}\n" for i in range(30)) + "[peft-search] trial 1 FAILED: x\n")
    assert log.tail(since, 5) == [f"line {i}" for i in range(25, 30)]
    assert log.tail(since, 100)[0] == "line 0"     # nothing from before the trial
    log.close()


def test_capture_sends_prints_warnings_and_library_logs_to_the_log_and_product_lines_to_the_terminal(tmp_path):
    out, err = Screen(tty=False), io.StringIO()
    library = logging.getLogger("some_library")
    own = logging.StreamHandler(sys.stderr)   # as Optuna's and transformers' own handlers hold the terminal
    library.addHandler(own)
    library.propagate = False
    stdout, stderr, root_handlers = sys.stdout, sys.stderr, logging.getLogger().handlers[:]
    try:
        with capture(str(tmp_path), console=Console(out, err)) as view:
            print("Configuration for experiment")
            warnings.warn("an experimental feature", UserWarning)
            library.warning("Token authentication is enabled")
            logging.getLogger("peft_search").info("resuming: 2 trials finished")
            logging.getLogger("peft_search").warning("1 trial failed only because of the cluster")
            assert console.current() is view and console.current_log() is not None
    finally:
        library.removeHandler(own)
    assert (sys.stdout, sys.stderr) == (stdout, stderr) and logging.getLogger().handlers == root_handlers
    assert own.stream is sys.stderr   # put back
    assert console.current_log() is None
    log = (tmp_path / "logs" / "search.log").read_text()
    for chatter in ("Configuration for experiment", "UserWarning: an experimental feature",
                    "Token authentication is enabled", "resuming: 2 trials finished"):
        assert chatter in log
    shown = out.getvalue() + err.getvalue()
    assert "Configuration" not in shown and "experimental" not in shown and "Token" not in shown
    assert "[peft-search] resuming: 2 trials finished\n" in out.getvalue()
    assert err.getvalue() == "[peft-search] warning: 1 trial failed only because of the cluster\n"
    assert out.getvalue().startswith(f"[peft-search] run directory {tmp_path}; library and worker output: "
                                     f"{tmp_path / 'logs' / 'search.log'}\n")


def test_an_error_that_ends_the_run_shows_the_logs_tail_and_path(tmp_path):
    out, err = Screen(tty=False), io.StringIO()
    with pytest.raises(RuntimeError) as raised:
        with capture(str(tmp_path), console=Console(out, err)):
            print("what a worker said before")
            raise RuntimeError("the trial pool was lost")
    path = str(tmp_path / "logs" / "search.log")
    assert console.failure_log(raised.value) == path
    shown = err.getvalue()
    assert "[peft-search] the search stopped (RuntimeError): the last" in shown and path in shown
    assert "    what a worker said before" in shown and "    RuntimeError: the trial pool was lost" in shown
    assert "Traceback (most recent call last)" in open(path).read()


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_no_tail_for_ctrl_c_or_an_input_problem(tmp_path, error):
    out, err = Screen(tty=False), io.StringIO()
    with pytest.raises(error) as raised:
        with capture(str(tmp_path), quiet=(ValueError,), console=Console(out, err)):
            raise error("space.r: changed")
    assert err.getvalue() == "" and console.failure_log(raised.value) is None


class Dispatcher:
    """Ray's dispatcher of forwarded worker output, as ray.init leaves it (cluster/local.py replaces its handler)."""

    def __init__(self):
        from ray._private.ray_logging import WorkerStandardStreamDispatcher
        self.real = WorkerStandardStreamDispatcher()
        self.printed = []
        self.real.add_handler(local.RAY_PRINT_LOGS, self.printed.append)


def test_forwarded_worker_output_goes_to_the_sink_while_one_is_set(monkeypatch):
    import ray._private.ray_logging as ray_logging
    import ray._private.worker as ray_worker

    fake = Dispatcher()
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", fake.real)
    # Ray's own filter of the autoscaler's lines asks the GCS which autoscaler runs: here, its events are marked
    monkeypatch.setattr(ray_worker, "filter_autoscaler_events",
                        lambda lines: (line.split(":event_summary:")[1] for line in lines if ":event_summary:" in line))
    monkeypatch.setattr(local, "worker_output_sink", None)
    assert local.route_worker_output() and local.route_worker_output()   # again: still one handler
    assert [name for name, _ in fake.real.handlers] == [local.RAY_PRINT_LOGS]
    batch = {"pid": 7, "actor_name": "TrainController", "lines": ["Requesting resources"], "is_err": False}
    fake.real.emit(batch)
    assert fake.printed == [batch]   # no sink: Ray prints as usual
    got = []
    monkeypatch.setattr(local, "worker_output_sink", got.append)
    fake.real.emit(batch)
    fake.real.emit({"pid": "autoscaler", "lines": ["======== Autoscaler status ========", "Node status"]})
    assert got == [batch] and fake.printed == [batch]   # the autoscaler's status table is no event: dropped
    fake.real.emit({"pid": "autoscaler", "lines": ["Node status", ":event_summary:Adding 1 node"]})
    assert got[-1]["lines"] == ["Adding 1 node"]


def test_capture_routes_worker_output_into_the_log_and_product_lines_to_the_terminal(tmp_path, monkeypatch):
    out = Screen(tty=False)
    monkeypatch.setattr(local, "worker_output_sink", None)
    with capture(str(tmp_path), console=Console(out, out)):
        local.worker_output_sink({"pid": 9, "actor_name": "RayTrainWorker", "is_err": True,
                                  "lines": ["Setting accelerator to CPU", "trial 2: worker lost; retrying"]})
    assert local.worker_output_sink is None
    log = (tmp_path / "logs" / "search.log").read_text()
    assert "(RayTrainWorker pid=9) Setting accelerator to CPU" in log
    assert "accelerator" not in out.getvalue()
    assert "[peft-search] trial 2: worker lost; retrying\n" in out.getvalue()
    assert os.path.isfile(tmp_path / "logs" / "search.log")
