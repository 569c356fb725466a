"""A search on a real two-node Ray cluster on this machine (tests/cluster/multinode_cluster.py), through
`peft-search run --address`, whose nodes are lost mid-search.

- A worker node is lost while one of its trials trains: that trial goes on from its checkpoint on the head
  node, no trial fails, none is lost or run twice, and the study holds exactly `search.trials` trials.
- The head is lost, the driver with it: `peft-search resume` on a new cluster finishes the search, keeping
  what had finished.

Each node has 4 logical CPUs and a trial's worker 3, so the two worker groups (concurrency 2) start one on each
node; the trial functions and the pool stay on the head, the driver's node. Trials: a tiny BERT, 3 eval rounds
(a checkpoint each), long enough for a trial to be caught between two rounds. The run directory is on this
machine's disk, which both nodes see (on a real cluster: `resources.storage_path`)."""
import csv

import pytest
from multinode_cluster import LocalCluster, checkpointed_rounds, driver, kill, trials, wait_for, write_spec
from optuna.trial import TrialState

from search.store.keys import FAILED_ON_KEY, NODES_ATTR, RETRIES_KEY
from trainers.tiny_models import build_tiny_classifier, make_learnable_classification_data

pytestmark = pytest.mark.slow

TRIALS = 6
NODE_CPUS, CPUS_PER_WORKER = 4, 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode-inputs")
    model = build_tiny_classifier(str(root / "tiny-bert"), num_labels=2)
    train = make_learnable_classification_data(str(root / "train.jsonl"), 960, seed=1)
    return model, train


def _spec(tmp_path, inputs, name):
    return write_spec(tmp_path, *inputs, name=name, trials=TRIALS, concurrency=2, cpus_per_worker=CPUS_PER_WORKER)


def _run(spec, tmp_path, address, log):
    return driver(["run", spec, "--runs-dir", str(tmp_path / "runs"), "--address", address], log)


def _running_on(run_dir, node_id):
    """A trial that runs on `node_id` now with its first round checkpointed: (number, 1). Only the first: a trial
    seen later in its rounds could finish before the node is lost, and then nothing would have to move."""
    rounds = checkpointed_rounds(run_dir)
    for trial in trials(run_dir):
        nodes = trial.user_attrs.get(NODES_ATTR) or []
        if trial.state == TrialState.RUNNING and nodes and nodes[-1] == node_id and rounds.get(trial.number) == 1:
            return trial.number, 1
    return None


def _assert_whole_search(run_dir):
    finished = trials(run_dir)
    assert [t.number for t in finished] == list(range(TRIALS)), [t.number for t in finished]
    assert all(t.state == TrialState.COMPLETE for t in finished), [(t.number, t.state, t.user_attrs) for t in finished]
    assert not any(t.user_attrs.get(FAILED_ON_KEY) for t in finished)
    with open(run_dir / "trials.csv", newline="") as handle:
        assert sorted(int(row["number"]) for row in csv.DictReader(handle)) == list(range(TRIALS))
    for number in range(TRIALS):   # every trial's files, on the disk both nodes wrote to
        assert (run_dir / "trials" / f"{number:04d}" / "settings.json").is_file()
    assert (run_dir / "best" / "adapter_model.safetensors").is_file()
    return finished


def test_a_lost_worker_node_costs_no_trial(tmp_path, inputs):
    cluster = LocalCluster(head_cpus=NODE_CPUS, worker_cpus=NODE_CPUS)
    head, (worker,) = cluster.head.node_id, [node.node_id for node in cluster.workers]
    log = tmp_path / "driver.log"
    process = None
    try:
        process = _run(_spec(tmp_path, inputs, "lose-worker"), tmp_path, cluster.address, log)
        run_dir = tmp_path / "runs" / "lose-worker"
        # trials ran on both nodes before the loss
        wait_for(lambda: {head, worker} <= {n for t in trials(run_dir) for n in t.user_attrs.get(NODES_ATTR, [])},
                 process, 300, "trials on both nodes")
        number, round_ = wait_for(lambda: _running_on(run_dir, worker), process, 300,
                                  "a trial between rounds on the worker node")
        cluster.lose(cluster.workers[0])
        assert process.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if process is not None:
            kill(process)
        cluster.shutdown()
    finished = _assert_whole_search(run_dir)
    moved = finished[number]
    # it went on on the head, from the round it had checkpointed, as the same Optuna trial
    assert moved.user_attrs[NODES_ATTR][-2:] == [worker, head], moved.user_attrs
    assert moved.user_attrs[RETRIES_KEY] >= 1 and moved.user_attrs.get("resumed_after_round", 0) >= round_
    assert f"trial {number}: " in log.read_text() and "retrying from its last checkpoint" in log.read_text()


@pytest.mark.load   # two clusters and two drivers: about two minutes on 2 cores; `pytest -m load` runs it
def test_a_lost_head_is_resumed_on_a_new_cluster(tmp_path, inputs):
    cluster = LocalCluster(head_cpus=NODE_CPUS, worker_cpus=NODE_CPUS)
    log = tmp_path / "driver.log"
    run_dir = tmp_path / "runs" / "lose-head"
    process, kept, checkpointed = None, {}, {}
    try:
        process = _run(_spec(tmp_path, inputs, "lose-head"), tmp_path, cluster.address, log)

        def some_finished_and_some_between_rounds():
            done = [t for t in trials(run_dir) if t.state.is_finished()]
            rounds = {n: r for n, r in checkpointed_rounds(run_dir).items() if r < 3}
            return done and set(rounds) - {t.number for t in done}

        wait_for(some_finished_and_some_between_rounds, process, 400, "a finished trial and one between rounds")
        checkpointed = checkpointed_rounds(run_dir)
        kill(process)                   # the head's machine goes: the driver on it, then its Ray
        cluster.lose(cluster.head)
        kept = {t.number: (t.state, t.value, t.datetime_complete) for t in trials(run_dir) if t.state.is_finished()}
    finally:
        if process is not None:
            kill(process)
        cluster.shutdown()
    interrupted = {n: r for n, r in checkpointed.items() if n not in kept and r < 3}
    assert kept and interrupted and len(kept) < TRIALS

    cluster = LocalCluster(head_cpus=NODE_CPUS, worker_cpus=NODE_CPUS)
    try:
        resume = driver(["resume", str(run_dir), "--address", cluster.address], log)
        try:
            assert resume.wait(timeout=600) == 0, log.read_text()[-4000:]
        finally:
            kill(resume)
    finally:
        cluster.shutdown()
    finished = _assert_whole_search(run_dir)
    for number, before in kept.items():   # kept as they were, not run again
        trial = finished[number]
        assert (trial.state, trial.value, trial.datetime_complete) == before
    for number, round_ in interrupted.items():   # went on from their checkpoint on the new cluster
        assert finished[number].user_attrs.get("resumed_after_round", 0) >= round_, finished[number].user_attrs
