"""A lost node or worker against a failure of the trial's own, without a cluster: the texts Ray 2.60 reports a
node loss with, the trial function's retries and its `failed_on: infrastructure` mark, what the searcher stores
of them, the pool's hand-over when a group is lost, and `resume` running the trials the cluster alone failed
(search/run/trial.py, search/run/pool.py, search/run/driver.py, search/run/resume.py).
tests/cluster/test_multinode.py loses real nodes."""
import threading
from dataclasses import replace

import optuna
import pytest
import ray
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search.run.driver import open_study
from search.run.pool import TrialPool
from search.run.protocol import CLOSED, END, REPORT, TrialJob, failure_reason, lost_to_infrastructure, worker_lost
from search.run.resume import infrastructure_failures, plan
from search.run.searcher import TRIAL_NUMBER_KEY, PeftOptunaSearch, make_sampler
from search.run.trial import tune_trial
from search.spec.search_spec import parse_spec
from search.store.keys import (FAIL_REASON_KEY, FAILED_ON_KEY, INFRASTRUCTURE, INFRASTRUCTURE_RERUNS_ATTR, NODE_KEY,
                               NODES_ATTR, RETRIES_KEY)
from search.store.rundir import RunPlace

# As Ray 2.60 reported them here (a cluster as tests/cluster/test_multinode.py's, a node lost under a running
# actor): first while the node's processes are gone but the node is not yet marked dead, then after.
UNAVAILABLE = ("The actor 19ddd6eeb393522a8c7eb42f01000000 is unavailable: The actor is temporarily unavailable: "
               "RpcError: RPC error: Socket closed rpc_code: 14. The task may or may not have been executed on "
               "the actor.")
UNREACHABLE = ("The actor 19ddd6eeb393522a8c7eb42f01000000 is unavailable: The actor is temporarily unavailable: "
               "RpcError: RPC error: failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:41751: "
               "Failed to connect to remote host: Connection refused rpc_code: 14. The task may or may not have "
               "been executed on the actor.")
NODE_DIED = ("The actor died unexpectedly before finishing this task.\n"
             "The actor died because its node has died. "
             "Node Id: 8e4cb0edbf06dea4907e5c7f008b5ec9a2da6158a08ab7b7e1bc0ae0")
# the other texts Ray 2.60's core and GCS give a lost worker, a lost owner, a lost node or raylet
OTHER_LOSSES = (
    "WorkerGroupError: The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker "
    "exit detail: Worker unexpectedly exits with a connection error code 2.",
    "The actor is dead because its owner has died. Owner Id: 01000000ffffffffffffffffffffffffffffffffffffffffffffffff",
    "Task failed because the node it was running on is dead or unavailable. Node IP: 10.0.0.3, node ID: 8e4c.",
    "The task's local raylet died. Check raylet.out for more information.",
    "The worker died unexpectedly while executing this task. Check python-core-worker-*.log files for more "
    "information.",
    "ActorDiedError: The actor died unexpectedly before finishing this task.",
)
OWN_FAILURES = (
    "diverged at step 3 (loss=nan)",
    "out of memory at step 2: CUDA out of memory",
    "OutOfMemoryError: Task was killed due to the node running low on memory.",
    "The actor is dead because its worker process has died. Worker exit type: NODE_OUT_OF_MEMORY Worker exit detail: "
    "Task was killed due to the node running low on memory.",
    "ValueError: target module q_proj not found",
    "RuntimeError: CUDA is unavailable on this host",
    "BlockingIOError: [Errno 11] Resource temporarily unavailable",
    "grpc._channel._InactiveRpcError: <_InactiveRpcError of RPC that terminated with StatusCode.UNAVAILABLE>",
)


@pytest.mark.parametrize("text", [UNAVAILABLE, UNREACHABLE, NODE_DIED, *OTHER_LOSSES])
def test_every_text_ray_gives_a_lost_node_or_worker_is_worth_a_retry(text):
    assert worker_lost(text)
    assert worker_lost(f"WorkerGroupError: {text.splitlines()[-1]}")   # as failure_reason reduces a group's error


@pytest.mark.parametrize("text", OWN_FAILURES)
def test_a_failure_of_the_trial_itself_is_not(text):
    assert not worker_lost(text)


def _group_error(failure):
    """Ray Train's WorkerGroupError as the controller raises it when polling a worker failed."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus

    error = WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: rank 0", failure=failure)
    return WorkerGroupPollStatus({0: WorkerStatus(running=False, error=error)}).get_worker_group_error()


def test_a_lost_worker_inside_ray_trains_error_is_recognised_by_its_type_and_its_reason_says_so():
    unavailable = ray.exceptions.ActorUnavailableError("The actor is temporarily unavailable: RpcError: x", None)
    for lost in (unavailable, ray.exceptions.ActorDiedError(), ray.exceptions.NodeDiedError("node gone")):
        error = _group_error(lost)
        assert lost_to_infrastructure(error), error
        assert worker_lost(failure_reason(error)), failure_reason(error)
    from ray.train import ControllerError

    assert worker_lost(failure_reason(ControllerError(ray.exceptions.ActorDiedError())))
    own = _group_error(ValueError("target module q_proj not found"))
    assert not lost_to_infrastructure(own) and not worker_lost(failure_reason(own))


# --- the trial function's retries, with a pool played without Ray


class _Call:
    def __init__(self, function):
        self.remote = lambda *args: (lambda: function(*args))



def place_in(spec, run_dir) -> RunPlace:
    """The spec's place, with `run_dir` as its run directory."""
    return replace(RunPlace.of(spec, "."), run_dir=str(run_dir))


def job(number: int, attempt: int = 0) -> TrialJob:
    return TrialJob(number=number, settings=None, output_dir="", run_dir="", search_name="t", params={},
                    tracking=None, remote=None, attempt=attempt)

class ScriptedPool:
    """A pool whose every run of a trial goes as `runs` says: a list per run of ("report", metrics), then
    ("end", reason or None); ("lost", exc) makes the pool's answer raise `exc`, as Ray does for a lost actor."""

    def __init__(self, runs):
        self.runs, self.submitted, self.events = list(runs), [], None
        self.submit = _Call(self._submit)
        self.next_report = _Call(self._next)
        self.cancel = _Call(lambda number: None)

    def _submit(self, number, job):
        self.submitted.append(job.attempt)
        self.events = list(self.runs.pop(0))

    def _next(self, number):
        kind, payload = self.events.pop(0)
        if kind == "lost":
            raise payload
        return (REPORT if kind == "report" else END), payload


def _spec(max_failures=2):
    return parse_spec({
        "name": "lost", "model": {"name_or_path": "minilm", "task": "sequence-classification"},
        "data": {"train": "train.jsonl", "label_field": "label"}, "peft": {"method": "lora"},
        "space": {"r": [4, 8]}, "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"max_failures": max_failures}, "tracking": {"wandb": "disabled"},
    }, base_dir=".", check_files=False, check_model=False)


def _run_trial(tmp_path, monkeypatch, runs, max_failures=2):
    reports = []
    monkeypatch.setattr(ray, "get", lambda thunk: thunk())
    monkeypatch.setattr("ray.tune.report", lambda metrics: reports.append(dict(metrics)))
    pool = ScriptedPool(runs)
    spec = _spec(max_failures)
    tune_trial({TRIAL_NUMBER_KEY: 3, "r": 4}, spec, place_in(spec, tmp_path), 1, pool)
    return reports, pool.submitted


ROUND = ("report", {"round": 1, "eval_accuracy": 0.5, NODE_KEY: "a"})


def test_a_trial_whose_node_was_lost_goes_on_and_says_after_how_many_retries(tmp_path, monkeypatch):
    reports, attempts = _run_trial(tmp_path, monkeypatch, [
        [ROUND, ("end", f"WorkerGroupError: {UNAVAILABLE}")],
        [("report", {"round": 2, "eval_accuracy": 0.6, NODE_KEY: "b"}), ("end", None)]])
    assert attempts == [0, 1]
    assert reports == [ROUND[1], {"round": 2, "eval_accuracy": 0.6, NODE_KEY: "b", RETRIES_KEY: 1}]


def test_a_trial_the_cluster_failed_past_its_retries_is_marked_so(tmp_path, monkeypatch):
    lost = ("end", f"WorkerGroupError: {NODE_DIED.splitlines()[-1]}")
    reports, attempts = _run_trial(tmp_path, monkeypatch, [[ROUND, lost], [lost], [lost]])
    assert attempts == [0, 1, 2]
    assert reports[-1][FAILED_ON_KEY] == INFRASTRUCTURE and reports[-1][RETRIES_KEY] == 2
    assert reports[-1][FAIL_REASON_KEY].endswith("(after 2 retries)")


def test_a_trial_that_failed_on_its_own_is_not_retried_nor_marked(tmp_path, monkeypatch):
    reports, attempts = _run_trial(tmp_path, monkeypatch, [[ROUND, ("end", "diverged at step 3 (loss=nan)")]])
    assert attempts == [0]
    assert reports[-1] == {FAIL_REASON_KEY: "diverged at step 3 (loss=nan)", RETRIES_KEY: 0}


def test_a_trial_whose_pool_was_lost_fails_at_once_marked_as_the_clusters_doing(tmp_path, monkeypatch):
    dead = ray.exceptions.ActorDiedError()
    reports, attempts = _run_trial(tmp_path, monkeypatch, [[ROUND, ("lost", dead)]])
    assert attempts == [0]   # another try would find no pool either
    assert reports[-1][FAILED_ON_KEY] == INFRASTRUCTURE
    assert reports[-1][FAIL_REASON_KEY].startswith("the trial pool was lost: The actor died unexpectedly")


# --- the pool when a group is lost


@pytest.fixture
def pool(monkeypatch):
    def start_group(self):   # no TorchTrainer: the test plays rank 0 itself
        group, self.started = self.started, self.started + 1
        self.groups[group] = set()

    monkeypatch.setattr(TrialPool, "_start_group", start_group)
    monkeypatch.setattr("search.run.pool.TAKE_POLL_S", 0.05)
    return TrialPool(slots=2, scaling=None, storage_path="unused", name="tune")


def test_a_take_left_waiting_by_a_lost_group_gives_way_and_leaves_the_trial_to_a_live_group(pool):
    pool.prestart(2, warm=None)
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.setdefault("job", pool.take(0)), daemon=True)
    thread.start()
    with pool.lock:   # what _run_group does when the group's Ray Train run ended with a lost worker
        pool.groups.pop(0)
        pool.gone.add(0)
    thread.join(2)
    assert waiting["job"] == CLOSED
    pool.submit(5, job(5))
    assert pool.take(0) == CLOSED           # a late call of the lost group takes nothing
    assert pool.take(1).number == 5


def test_a_rank0_lost_while_it_waited_at_a_report_is_let_go_and_an_earlier_run_cannot_report(pool):
    pool.submit(2, job(2, attempt=0))
    pool.take(0)
    answer = {}
    thread = threading.Thread(target=lambda: answer.setdefault("stop", pool.put_report(2, {"round": 1}, 0)),
                              daemon=True)
    thread.start()
    assert pool.next_report(2)[0] == REPORT
    with pool.lock:
        numbers = pool.groups.pop(0)
    for number in numbers:
        pool._end(number, f"WorkerGroupError: {UNAVAILABLE}")
    thread.join(2)
    assert answer["stop"] is True           # the pool's thread is free again
    assert pool.next_report(2)[0] == END
    pool.submit(2, job(2, attempt=1))   # the retry
    assert pool.put_report(2, {"round": 1}, 0) is True   # a report of the lost run: told to stop, not delivered
    pool.finish(0, 2, "late", 0)
    assert pool.mailboxes[2].reports.empty()


# --- what the searcher stores, and resume


def _searcher(tmp_path, resume=()):
    return PeftOptunaSearch(space={"x": FloatDistribution(0.0, 1.0)}, metric="eval_accuracy", mode="max",
                            sampler=make_sampler("tpe", 0), study_name="peft-search",
                            storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/study.sqlite3"),
                            decode=dict, resume=resume)


def _result(round_, value=0.5, **extra):
    return {"round": round_, "training_iteration": round_, "eval_accuracy": value, "rounds_total": 2, **extra}


def test_the_searcher_stores_nodes_retries_and_the_infrastructure_mark(tmp_path):
    search = _searcher(tmp_path)
    for trial in "abc":
        search.suggest(trial)
    search.on_trial_result("a", _result(1, **{NODE_KEY: "n1"}))
    search.on_trial_result("a", _result(2, **{NODE_KEY: "n2", RETRIES_KEY: 1}))
    search.on_trial_complete("a", _result(2, **{NODE_KEY: "n2", RETRIES_KEY: 1}))
    search.on_trial_result("b", _result(1, **{NODE_KEY: "n1"}))
    lost = {FAIL_REASON_KEY: "worker lost (after 2 retries)", RETRIES_KEY: 2, FAILED_ON_KEY: INFRASTRUCTURE}
    search.on_trial_result("b", lost)
    search.on_trial_complete("b", lost)
    search.on_trial_complete("c", {FAIL_REASON_KEY: "diverged at step 1 (loss=nan)", RETRIES_KEY: 0})
    a, b, c = search._ot_study.get_trials()
    assert a.state == TrialState.COMPLETE and a.user_attrs[NODES_ATTR] == ["n1", "n2"]
    assert a.user_attrs[RETRIES_KEY] == 1
    assert b.state == TrialState.FAIL and b.user_attrs[FAILED_ON_KEY] == INFRASTRUCTURE
    assert c.state == TrialState.FAIL and FAILED_ON_KEY not in c.user_attrs
    assert infrastructure_failures(search._ot_study) == [1]


def test_resume_runs_a_trial_the_cluster_failed_again_under_its_number_and_keeps_its_own_failures(tmp_path):
    first = _searcher(tmp_path)
    configs = [first.suggest(trial) for trial in "abcd"]
    first.on_trial_complete("a", _result(2, 0.7))
    first.on_trial_result("b", _result(1, 0.4, **{NODE_KEY: "lost-node"}))
    first.on_trial_complete("b", {FAIL_REASON_KEY: "worker lost", FAILED_ON_KEY: INFRASTRUCTURE, RETRIES_KEY: 2})
    first.on_trial_complete("c", {FAIL_REASON_KEY: "diverged at step 1 (loss=nan)"})
    # d: its driver was killed, left RUNNING

    spec = parse_spec({
        "name": "lost", "model": {"name_or_path": "minilm", "task": "sequence-classification"},
        "data": {"train": "train.jsonl", "label_field": "label"}, "peft": {"method": "lora"},
        "space": {"r": [4, 8]}, "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"trials": 5},
    }, base_dir=".", check_files=False, check_model=False)
    study = open_study(spec, place_in(spec, tmp_path), resume=True)
    todo = plan(study, spec.search.trials)
    assert (todo.finished, todo.interrupted, todo.new) == (2, [1, 3], 1)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL, TrialState.RUNNING]
    assert FAIL_REASON_KEY not in trials[1].user_attrs and FAILED_ON_KEY not in trials[1].user_attrs
    assert trials[1].user_attrs[INFRASTRUCTURE_RERUNS_ATTR] == 1 and trials[2].user_attrs[FAIL_REASON_KEY]

    resumed = _searcher(tmp_path, resume=todo.interrupted)
    again = resumed.suggest("b2")
    assert again == configs[1] and again[TRIAL_NUMBER_KEY] == 1   # its own number and parameters
    resumed.on_trial_result("b2", _result(2, 0.8, **{NODE_KEY: "other-node"}))
    resumed.on_trial_complete("b2", _result(2, 0.8))
    trial = resumed._ot_study.get_trials()[1]
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.8)
    assert trial.user_attrs[NODES_ATTR] == ["lost-node", "other-node"]
    assert len(resumed._ot_study.get_trials()) == 4 and infrastructure_failures(resumed._ot_study) == []
