"""The trial pool's hand-over between Tune trial functions and worker groups (search/run/pool.py), without Ray:
the actor's methods called from threads, as Ray's threaded actor calls them."""
import threading

import pytest

from search.run.pool import TrialPool
from search.run.protocol import END, REPORT, TrialJob


def job(number: int) -> TrialJob:
    """A trial as the pool sees it: the pool reads only its number and attempt."""
    return TrialJob(number=number, settings=None, output_dir="", run_dir="", search_name="t", params={},
                    tracking=None, remote=None)


@pytest.fixture
def pool(monkeypatch):
    started = []

    def start_group(self):   # no TorchTrainer: the test plays rank 0 itself
        group, self.started = self.started, self.started + 1
        self.groups[group] = set()
        started.append(group)

    monkeypatch.setattr(TrialPool, "_start_group", start_group)
    pool = TrialPool(slots=2, scaling=None, storage_path="unused", name="tune")
    pool.started_groups = started
    return pool


def in_thread(function, *args):
    """Run `function` on a thread; returns a getter that waits for its result (at most 5 s)."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", function(*args)), daemon=True)
    thread.start()

    def get():
        thread.join(5)
        assert not thread.is_alive(), f"{function.__name__} still blocked"
        return result["value"]

    get.thread = thread
    return get


def test_rank0_waits_at_each_report_until_the_trial_asks_for_the_next(pool):
    pool.submit(7, job(7))
    assert pool.take(0) == job(7) and pool.groups == {0: {7}}
    answer = in_thread(pool.put_report, 7, {"round": 1})
    assert pool.next_report(7) == (REPORT, {"round": 1})
    answer.thread.join(0.2)
    assert answer.thread.is_alive()          # Tune has not taken its decision yet: rank 0 waits
    following = in_thread(pool.next_report, 7)   # tune.report returned: the trial goes on
    assert answer() is False
    pool.finish(0, 7, None)
    assert following() == (END, None)
    assert pool.groups == {0: set()} and 7 not in pool.mailboxes


def test_a_cancelled_trial_stops_at_its_report_and_later_reports(pool):
    pool.submit(1, job(1))
    pool.take(0)
    answer = in_thread(pool.put_report, 1, {"round": 1})
    assert pool.next_report(1)[0] == REPORT
    pool.cancel(1)                             # ASHA stopped it
    assert answer() is True
    assert pool.put_report(1, {"round": 2}) is True   # a report after the stop: stop again
    pool.cancel(1)                             # twice (function and callback) is harmless


def test_a_trial_cancelled_before_a_group_took_it_is_skipped(pool):
    pool.submit(1, job(1))
    pool.submit(2, job(2))
    pool.cancel(1)
    assert pool.take(0) == job(2)


def test_groups_are_started_when_trials_want_them_up_to_the_slots(pool):
    pool.submit(1, job(1))
    assert pool.started_groups == [0]
    pool.submit(2, job(2))
    pool.submit(3, job(3))
    assert pool.started_groups == [0, 1]        # slots=2
    pool.take(0)
    pool.finish(0, 1, None)
    assert pool.next_report(1) == (END, None)
    pool.submit(4, job(4))
    assert pool.started_groups == [0, 1]        # the groups are reused, not started again


def test_prestarted_groups_are_as_many_as_trials_need_and_later_trials_reuse_them(pool):
    pool.prestart(1, warm="settings")            # one trial to run: one group, though there are 2 slots
    assert pool.started_groups == [0] and pool.warm == "settings"
    pool.prestart(5, warm="settings")
    assert pool.started_groups == [0, 1]         # never more than the slots
    pool.submit(1, job(1))
    pool.submit(2, job(2))
    assert pool.started_groups == [0, 1]         # the trials go to the groups already started


def test_a_base_that_cannot_be_loaded_ahead_leaves_the_cache_empty_for_the_trial_to_fail_on(monkeypatch):
    from search.run import pool as pool_module

    def load(settings):
        raise OSError("no such model")

    monkeypatch.setattr("trainers.model.load_lent_base", load)
    settings = _cpu_settings()
    cache = pool_module.BaseCache.warmed(settings)   # logged, not raised: a group that died here would take no trial
    assert cache.key is None and cache.base is None
    with pytest.raises(OSError, match="no such model"):
        cache.get(settings)                          # the trial's own load raises, and the trial fails with it


def _cpu_settings():
    from trainers.settings import DataSettings, EngineSettings, ModelSettings, TrialSettings

    return TrialSettings(model=ModelSettings("unused"), data=DataSettings(train="unused.jsonl"),
                         engine=EngineSettings(deepspeed=False))


def test_the_trial_of_a_group_that_died_ends_with_the_reason(pool):
    pool.submit(3, job(3))
    pool.take(0)
    with pool.lock:
        (number,) = pool.groups.pop(0)
    pool._end(number, "WorkerGroupError: The actor is dead because its worker process has died")
    kind, reason = pool.next_report(3)
    assert kind == END and "worker process has died" in reason


def test_a_packing_group_takes_trials_without_waiting_and_groups_start_per_pack(monkeypatch):
    from search.run.protocol import NO_TRIAL

    monkeypatch.setattr(TrialPool, "_start_group", lambda self: self.groups.setdefault(len(self.groups), set()))
    pool = TrialPool(slots=2, scaling=None, storage_path="unused", name="tune", pack=3)
    for number in range(4):
        pool.submit(number, job(number))
    assert len(pool.groups) == 2                 # 4 trials, 3 to a group
    assert [pool.take(0, wait=False).number for _ in range(3)] == [0, 1, 2]
    assert pool.groups[0] == {0, 1, 2}
    pool.take(1)
    assert pool.take(1, wait=False) == NO_TRIAL  # nothing waits: the pack trains on


def test_closing_the_pool_ends_every_groups_loop_and_says_whether_all_ended(monkeypatch):
    from search.run.protocol import CLOSED

    taken, busy = [], threading.Event()

    def group_loop(self, group):   # rank 0's loop of serve_trials, without the training
        while True:
            job = self.take(group)
            if job == CLOSED:
                return
            taken.append(job.number)
            if job.number == 9:
                busy.wait(10)      # a group still in its trial when the search ends

    monkeypatch.setattr(TrialPool, "_run_group", group_loop)
    pool = TrialPool(slots=2, scaling=None, storage_path="unused", name="tune")
    pool.submit(1, job(1))
    pool.submit(2, job(2))
    assert len(pool.threads) == 2
    assert pool.close(timeout=5) is True          # both loops took CLOSED after their trials
    assert sorted(taken) == [1, 2] and not any(t.is_alive() for t in pool.threads.values())

    stuck = TrialPool(slots=1, scaling=None, storage_path="unused", name="tune")
    stuck.submit(9, job(9))
    assert stuck.close(timeout=0.3) is False      # the driver kills what is left
    busy.set()


def test_closing_the_pool_does_not_wait_for_a_group_whose_loop_has_ended(monkeypatch):
    """A group's loop says it ended; its Ray Train run's own shutdown (here: a thread that lives on) is not
    waited for."""
    from search.run.protocol import CLOSED

    shutting_down = threading.Event()

    def group_loop(self, group):
        assert self.take(group) == CLOSED
        self.loop_ended(group)
        shutting_down.wait(10)

    monkeypatch.setattr(TrialPool, "_run_group", group_loop)
    pool = TrialPool(slots=1, scaling=None, storage_path="unused", name="tune")
    pool.prestart(1, warm=None)
    # True while the thread still lives: close returned on the loop's word, not when the thread ended
    assert pool.close(timeout=60) is True and pool.threads[0].is_alive()
    shutting_down.set()
