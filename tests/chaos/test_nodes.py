"""Chaos at scale: worker nodes of a real multi-node Ray cluster on this machine are lost at random points of a
search of many short trials (the load test's shape: a tiny BERT, two eval rounds), and a fresh node joins after
each loss. Every trial must end accounted for: none lost, none run twice, the study holding exactly
`search.trials` trials; those the cluster failed past their retries are run again by `peft-search resume`.
Writes the figures (trials finished, retried, rerun by resume, lost) to benchmarks/results/chaos_nodes.json.

Marked `load`: minutes on 2 cores, not in the default run. Size: PEFT_SEARCH_CHAOS_NODE_TRIALS (default 40),
PEFT_SEARCH_CHAOS_REMOVALS (default 4), PEFT_SEARCH_CHAOS_SEED:
    python -m pytest -q -s -m load tests/chaos/test_nodes.py
"""
import collections
import json
import os
import random
import sys
import time

import pytest
from optuna.trial import TrialState

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cluster"))

from multinode_cluster import REPO, LocalCluster, driver, kill, trials, write_spec  # noqa: E402

from search.store.keys import FAILED_ON_KEY, INFRASTRUCTURE_RERUNS_ATTR, NODES_ATTR, RETRIES_KEY  # noqa: E402
from trainers.tiny_models import build_tiny_classifier, make_learnable_classification_data  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.load]

TRIALS = int(os.environ.get("PEFT_SEARCH_CHAOS_NODE_TRIALS", "40"))
REMOVALS = int(os.environ.get("PEFT_SEARCH_CHAOS_REMOVALS", "4"))
SEED = int(os.environ.get("PEFT_SEARCH_CHAOS_SEED", "7"))
CONCURRENCY = 4
# 2 logical CPUs a worker: the head (its trial functions take a little) holds one group, each worker node two
HEAD_CPUS, WORKER_CPUS, CPUS_PER_WORKER, WORKER_NODES = 4, 4, 2, 2
BUSY_WAIT_S = 15
RESULTS = os.path.join(REPO, "benchmarks", "results", "chaos_nodes.json")


def _busy_worker_node(cluster, run_dir):
    """A worker node (its Node) whose group runs a trial now, or None."""
    running = {(t.user_attrs.get(NODES_ATTR) or [None])[-1] for t in trials(run_dir) if t.state == TrialState.RUNNING}
    busy = [node for node in cluster.workers if node.node_id in running]
    return busy or None


def _finished_count(run_dir):
    return sum(1 for t in trials(run_dir) if t.state.is_finished())


def test_random_node_losses_lose_no_trial(tmp_path):
    rng = random.Random(SEED)
    model = build_tiny_classifier(str(tmp_path / "tiny-bert"), num_labels=2)
    train = make_learnable_classification_data(str(tmp_path / "train.jsonl"), 96, seed=1)
    spec = write_spec(tmp_path, model, train, name="chaos-nodes", trials=TRIALS, concurrency=CONCURRENCY,
                      cpus_per_worker=CPUS_PER_WORKER, epochs=2, max_failures=3)
    run_dir, log = tmp_path / "runs" / "chaos-nodes", tmp_path / "driver.log"
    cluster = LocalCluster(head_cpus=HEAD_CPUS, worker_cpus=WORKER_CPUS, workers=WORKER_NODES)
    started, removals, rerun, process = time.time(), [], [], None
    try:
        process = driver(["run", spec, "--runs-dir", str(tmp_path / "runs"), "--address", cluster.address], log)
        # the losses spread over the first two thirds of the search, each on a node running a trial if one
        # does within BUSY_WAIT_S, else on any worker node
        spacing = max(1, TRIALS * 2 // 3 // REMOVALS)
        for index in range(REMOVALS):
            due, busy = spacing * (index + 1), None
            while process.poll() is None and _finished_count(run_dir) < due:
                time.sleep(0.3)
            deadline = time.time() + BUSY_WAIT_S
            while process.poll() is None and not busy and time.time() < deadline:
                time.sleep(0.3)
                busy = _busy_worker_node(cluster, run_dir)
            if process.poll() is not None:
                break
            time.sleep(rng.uniform(0, 1.5))   # somewhere in a trial, not just as it reported
            node = rng.choice(busy or cluster.workers)
            reported_there = sorted(t.number for t in trials(run_dir) if t.state == TrialState.RUNNING
                                   and (t.user_attrs.get(NODES_ATTR) or [None])[-1] == node.node_id)
            cluster.lose(node)
            removals.append({"at_s": round(time.time() - started, 1), "node": node.node_id[:12],
                             "running_trials_that_had_reported_from_it": reported_there,
                             "finished_before": _finished_count(run_dir)})
            cluster.add_worker()   # a fresh machine takes its place
        status = process.wait(timeout=1800)
        assert status == 0, log.read_text()[-4000:]
        left = [t.number for t in trials(run_dir) if t.user_attrs.get(FAILED_ON_KEY)]
        if left:   # failed by the cluster past their retries: resume runs them again
            rerun = left
            resume = driver(["resume", str(run_dir), "--address", cluster.address], log)
            assert resume.wait(timeout=1800) == 0, log.read_text()[-4000:]
    finally:
        if process is not None:
            kill(process)
        cluster.shutdown()
    wall = time.time() - started

    final = trials(run_dir)
    numbers = collections.Counter(t.number for t in final)
    states = collections.Counter(t.state.name for t in final)
    figures = {
        "trials": TRIALS, "concurrency": CONCURRENCY, "seed": SEED,
        "nodes": {"head_cpus": HEAD_CPUS, "worker_nodes": WORKER_NODES, "worker_cpus": WORKER_CPUS,
                  "cpus_per_trial_worker": CPUS_PER_WORKER},
        "cores": len(os.sched_getaffinity(0)),
        "removals": removals,
        "finished": sum(1 for t in final if t.state.is_finished()),
        "states": dict(states),
        "retried": sum(1 for t in final if t.user_attrs.get(RETRIES_KEY)),
        "retries_total": sum(int(t.user_attrs.get(RETRIES_KEY) or 0) for t in final),
        "retries_logged": log.read_text().count("retrying from its last checkpoint"),
        "ran_on_several_nodes": sum(1 for t in final if len(set(t.user_attrs.get(NODES_ATTR) or [])) > 1),
        "failed_by_the_cluster_then_rerun_by_resume": len(rerun),
        "rerun_attr_set": sum(1 for t in final if t.user_attrs.get(INFRASTRUCTURE_RERUNS_ATTR)),
        "failed_by_the_cluster_at_the_end": sum(1 for t in final if t.user_attrs.get(FAILED_ON_KEY)),
        "lost": len(set(range(TRIALS)) - set(numbers)) + sum(1 for t in final if not t.state.is_finished()),
        "duplicated": sum(count - 1 for count in numbers.values() if count > 1),
        "study_trials": len(final),
        "wall_s": round(wall, 1),
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(figures, handle, indent=2)
    print(f"\nchaos (nodes): {json.dumps(figures)}")
    assert removals, "the search ended before any node was lost"
    assert figures["lost"] == 0 and figures["duplicated"] == 0 and figures["study_trials"] == TRIALS, figures
    assert figures["failed_by_the_cluster_at_the_end"] == 0, figures
    assert states.get("FAIL", 0) == 0, [(t.number, t.user_attrs.get("fail_reason")) for t in final
                                        if t.state == TrialState.FAIL]
