"""Progress lines: counts by outcome, running trials, best so far and time left (Tune calls these hooks); on a
terminal a status line rewritten in place, elsewhere plain lines; a failed trial's log tail."""
import pickle
from types import SimpleNamespace

from test_console import Screen

from search.run.console import CLEAR_LINE, Console, RunLog
from search.run.progress import ProgressLines
from search.run.searcher import FAIL_REASON_KEY, TRIAL_NUMBER_KEY


def trial(number, status, **result):
    return SimpleNamespace(config={TRIAL_NUMBER_KEY: number}, status=status, last_result=result)


def test_lines_count_outcomes_running_and_best(capsys):
    progress = ProgressLines("eval_accuracy", "max", total=5, heartbeat_s=0)
    a = trial(0, "TERMINATED", round=3, rounds_total=3, eval_accuracy=0.7)
    b = trial(1, "TERMINATED", round=1, rounds_total=3, eval_accuracy=0.9)   # stopped early: not "best"
    c = trial(2, "TERMINATED", **{FAIL_REASON_KEY: "diverged at step 4 (loss=nan)"})   # reported its reason
    d = trial(3, "RUNNING")
    progress.on_trial_complete(0, [a, b, c, d], a)
    progress.on_trial_complete(0, [a, b, c, d], b)
    progress.on_trial_complete(0, [a, b, c, d], c)
    progress.on_step_end(0, [a, b, c, d])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("[peft-search] trial 0 complete after round 3: eval_accuracy=0.7 | 1/5 done")
    assert "trial 1 pruned after round 1" in lines[1] and "best eval_accuracy=0.7" in lines[1]
    assert "trial 2 FAILED: diverged at step 4 (loss=nan)" in lines[2]
    assert "3/5 done (1 complete, 1 pruned, 1 failed), 1 running" in lines[3]
    assert "s left" in lines[3]


def test_several_objectives_are_all_shown_and_heartbeat_waits(capsys):
    progress = ProgressLines(["eval_accuracy", "adapter_mb"], ["max", "min"], total=2, heartbeat_s=3600)
    a = trial(0, "TERMINATED", round=2, rounds_total=2, eval_accuracy=0.8, adapter_mb=1.5)
    progress.on_step_end(0, [a])          # nothing running: no heartbeat
    progress.on_trial_complete(0, [a], a)
    progress.on_step_end(0, [trial(1, "RUNNING")])   # within the heartbeat interval: quiet
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "eval_accuracy=0.8, adapter_mb=1.5" in out[0]


def test_on_a_tty_the_tally_is_a_status_line_rewritten_in_place_below_the_trial_lines():
    out = Screen(tty=True)
    progress = ProgressLines("eval_loss", "min", total=4, console=Console(out, out, width=200))
    progress.started -= 100   # 100 s into the search
    a, b, c = trial(0, "RUNNING"), trial(1, "RUNNING"), trial(2, "PENDING")
    progress.on_step_end(0, [a, b, c])
    progress.last_status -= 2
    progress.on_step_end(1, [a, b, c])
    assert out.getvalue().count("\n") == 0   # only the status line so far: no heartbeat lines on a terminal
    a.status, a.last_result = "TERMINATED", {"round": 2, "rounds_total": 2, "eval_loss": 0.5}
    progress.on_trial_complete(2, [a, b, c], a)
    screen = out.getvalue().split("\n")
    assert screen[0].endswith("[peft-search] trial 0 complete after round 2: eval_loss=0.5 | 1/4 done (1 complete), "
                              "1 running, best eval_loss=0.5, 100s elapsed, ~300s left")
    assert screen[0].rsplit(CLEAR_LINE, 1)[-1].startswith("[peft-search] trial 0")   # the status erased first
    assert screen[1] == "[peft-search] 1/4 done (1 complete), 1 running, best eval_loss=0.5, 100s elapsed, ~300s left"
    assert screen[0].count(CLEAR_LINE) == 1 and screen[0].count("[peft-search]") == 2   # the status, then the line
    progress.on_experiment_end([a, b, c])
    assert out.getvalue().endswith(CLEAR_LINE)


def test_not_a_tty_gets_no_status_line_and_no_escape_codes():
    out = Screen(tty=False)
    progress = ProgressLines("eval_accuracy", "max", total=2, heartbeat_s=0, console=Console(out, out))
    a = trial(0, "RUNNING")
    progress.on_step_end(0, [a])
    progress.on_experiment_end([a])
    assert out.getvalue().startswith("[peft-search] 0/2 done, 1 running, best eval_accuracy=None")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_failed_trial_shows_the_log_lines_since_it_started_and_the_logs_path(tmp_path):
    out = Screen(tty=False)
    log = RunLog(str(tmp_path))
    progress = ProgressLines("eval_accuracy", "max", total=3, console=Console(out, out), log=log, tail_wait_s=0)
    log.write("(RayTrainWorker pid=1) an earlier trial's chatter\n")
    a = trial(0, "RUNNING")
    progress.on_trial_start(0, [a], a)
    log.write("".join(f"(RayTrainWorker pid=2) step {i}\n" for i in range(25)))
    a.status, a.last_result = "TERMINATED", {FAIL_REASON_KEY: "diverged at step 24 (loss=nan)"}
    progress.on_trial_complete(1, [a], a)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[peft-search] trial 0 FAILED: diverged at step 24 (loss=nan) | 1/3 done (1 failed)")
    assert lines[1] == f"[peft-search] trial 0 failed: the last 20 lines of {tmp_path / 'logs' / 'search.log'}:"
    assert lines[2:] == [f"    (RayTrainWorker pid=2) step {i}" for i in range(5, 25)]
    log.close()


def test_a_failed_trials_tail_waits_for_the_workers_last_lines_until_the_search_ends(tmp_path):
    out = Screen(tty=False)
    log = RunLog(str(tmp_path))
    progress = ProgressLines("eval_accuracy", "max", total=2, console=Console(out, out), log=log, tail_wait_s=3600)
    a = trial(5, "RUNNING")
    progress.on_trial_start(0, [a], a)
    progress.on_trial_error(1, [a], a)
    log.write("Traceback (most recent call last):\nRuntimeError: CUDA error\n")   # forwarded after the failure
    progress.on_step_end(2, [a])
    assert "last" not in out.getvalue()
    progress.on_experiment_end([a])
    assert out.getvalue().splitlines()[-2:] == ["    Traceback (most recent call last):",
                                                "    RuntimeError: CUDA error"]
    log.close()


def test_the_callback_pickles_without_its_terminal_and_log(tmp_path):
    # Tune pickles its callbacks into tuner.pkl
    log = RunLog(str(tmp_path))
    progress = ProgressLines("eval_accuracy", "max", total=2, console=Console(Screen(True), Screen(True)), log=log)
    copy = pickle.loads(pickle.dumps(progress))
    assert copy.total == 2 and copy.log is None and copy.console is not None
    log.close()


def test_trials_failing_together_do_not_show_the_same_lines_twice(tmp_path):
    out = Screen(tty=False)
    log = RunLog(str(tmp_path))
    progress = ProgressLines("eval_accuracy", "max", total=2, console=Console(out, out), log=log, tail_wait_s=0)
    a, b = trial(0, "RUNNING"), trial(1, "RUNNING")
    progress.on_trial_start(0, [a, b], a)
    progress.on_trial_start(0, [a, b], b)
    log.write("RuntimeError: the one traceback\n")
    progress.on_trial_error(1, [a, b], a)
    progress.on_trial_error(1, [a, b], b)
    lines = out.getvalue().splitlines()
    assert lines.count("    RuntimeError: the one traceback") == 1
    assert lines[-1] == f"[peft-search] trial 1 failed: no new lines in {tmp_path / 'logs' / 'search.log'}"
    log.close()


def test_only_the_first_failed_trials_show_a_tail(tmp_path):
    out = Screen(tty=False)
    log = RunLog(str(tmp_path))
    progress = ProgressLines("eval_accuracy", "max", total=5, console=Console(out, out), log=log, tail_wait_s=0)
    for number in range(5):
        t = trial(number, "RUNNING")
        progress.on_trial_start(0, [t], t)
        log.write(f"traceback of trial {number}\n")
        progress.on_trial_error(1, [t], t)
    shown = out.getvalue()
    assert [n for n in range(5) if f"    traceback of trial {n}" in shown] == [0, 1, 2]
    assert "trial 2 failed (the next failed trials' lines are in the log only): the last 1 lines" in shown
    assert shown.count("FAILED") == 5
    log.close()


def test_a_new_best_at_a_range_edge_is_flagged_once_with_the_wider_range(capsys):
    from search.refine.edges import SpaceEdges
    from search.spec.search_spec import parse_spec

    spec = parse_spec({
        "name": "edges", "model": {"name_or_path": "minilm"}, "data": {"train": "t.jsonl", "label_field": "label"},
        "peft": {"method": "lora"}, "space": {"learning_rate": {"low": 1e-4, "high": 3e-3, "log": True}},
        "tracking": {"wandb": "disabled"}}, check_files=False, check_model=False)
    progress = ProgressLines("eval_accuracy", "max", total=4, heartbeat_s=3600, edges=SpaceEdges(spec.space, spec.peft.method))

    def finished(number, lr, accuracy):
        t = SimpleNamespace(config={TRIAL_NUMBER_KEY: number, "learning_rate": lr}, status="TERMINATED",
                            last_result={"round": 1, "rounds_total": 1, "eval_accuracy": accuracy})
        progress.on_trial_complete(0, [t], t)

    finished(0, 5e-4, 0.5)     # mid-range: nothing to flag
    finished(1, 2.9e-3, 0.7)   # a new best at the top edge
    finished(2, 2.8e-3, 0.6)   # not a new best
    finished(3, 2.95e-3, 0.8)  # a new best at the same edge: flagged once only
    lines = capsys.readouterr().out.strip().splitlines()
    flagged = [line for line in lines if "range edge" in line]
    assert len(flagged) == 1 and lines.index(flagged[0]) == 2
    assert "learning_rate: the best trial's 0.0029 lies at the high end of 1e-4–0.003 (log)" in flagged[0]
    assert "widen it to 1e-4–0.0164 (log)" in flagged[0]
