"""Progress lines: counts by outcome, running trials, best so far and time left (Tune calls these hooks)."""
from types import SimpleNamespace

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
