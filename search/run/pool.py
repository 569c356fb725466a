"""Persistent trial workers: Ray Train worker groups that outlive trials and keep the base model loaded.

A Ray Train worker group started per trial costs far more than a short trial's training on a small machine
(benchmarks/trial_overhead.py measures it against shared/anchors/naive_tune.py): processes, the
torch.distributed group, imports, the base model read from disk. Here a search starts at most `concurrency`
groups, each one TorchTrainer whose workers loop over trials (`serve_trials`): every trial gets a fresh
adapter, optimizer, schedule and data on the base its group loaded once (trainers/recipe.run_trial's lent
base).

    Tune trial function --submit / next_report / cancel--> TrialPool actor <--take / put_report / finish-- rank 0
                                                            (a mailbox a trial)              (of each group)

A trial's reports go rank 0 -> pool -> trial function -> tune.report. Rank 0 waits at each report until the
trial function asks for the next one (Tune let the trial go on) or cancels it (ASHA stopped it), so a
stopped trial trains no further. A group whose worker dies ends its TorchTrainer; the trial it ran ends
with the reason, and search/run/trial.py runs it again from its checkpoint on a group that works (a new one is
started in place of the lost one).

The pool and the groups' Ray Train controllers (which Ray Train starts on the node of the process calling
`fit`, the pool's) live on the driver's node: a lost worker node takes only the workers placed on it.
"""
from __future__ import annotations

import gc
import queue
import threading
import time
from typing import Any, Dict, Optional, Tuple

from search.run.protocol import CLOSED, END, GO_ON, NO_TRIAL, REPORT, STOP, TrialJob, failure_reason
from search.store.keys import NODE_KEY
from search.store.remote import KEY, one_line

TAKE_POLL_S = 0.5   # how often a group's waiting `take` checks that the group still lives


class TrialStopped(Exception):
    """Tune stopped the trial (ASHA): the recipe cleans up and the group takes the next one."""


class _Mailbox:
    def __init__(self, attempt: Optional[int] = None):
        self.attempt = attempt                        # the trial's run it serves (search/run/trial.py retries)
        self.reports: queue.Queue = queue.Queue()     # (REPORT, metrics) ... then (END, error or None)
        self.decisions: queue.Queue = queue.Queue()   # GO_ON / STOP, one per report
        self.owed = False                             # a report was handed out and awaits its decision


class TrialPool:
    """Hands trials to worker groups and carries their reports; a threaded Ray actor (see `start_pool`).

    Its methods block (a group waiting for a trial, a trial waiting for a report), each on its own thread."""

    def __init__(self, slots: int, scaling, storage_path: str, name: str, pack: int = 1, storage_filesystem=None):
        self.slots, self.scaling, self.storage_path, self.name = slots, scaling, storage_path, name
        self.storage_filesystem = storage_filesystem     # pyarrow's, when storage_path lies in object storage
        self.pack = pack                                 # trials a group trains at once (trainers/packing/pack.py)
        self.jobs: queue.Queue = queue.Queue()           # (number, job)
        self.mailboxes: Dict[int, _Mailbox] = {}         # trials submitted and not yet ended
        self.groups: Dict[int, set] = {}                 # live group -> the trials it runs
        self.started = 0
        self.threads: Dict[int, threading.Thread] = {}   # group -> the thread running its TorchTrainer
        self.ended = set()                               # groups whose loop has ended (`loop_ended`)
        self.gone = set()                                # groups whose Ray Train run has ended (lost, or closed)
        self.warm = None                                 # settings whose base a new group loads before any trial
        self.lock = threading.Lock()

    # --- the Tune trial function's side
    def submit(self, number: int, job: TrialJob) -> None:
        with self.lock:
            self.mailboxes[number] = _Mailbox(job.attempt)
            self._start_groups_for(len(self.mailboxes))
        self.jobs.put((number, job))

    def next_report(self, number: int) -> Tuple[str, Any]:
        """(REPORT, metrics) or, once the trial is over, (END, its failure reason or None)."""
        box = self.mailboxes[number]
        if box.owed:
            box.decisions.put(GO_ON)   # asking for the next report means Tune took the last one and goes on
        kind, payload = box.reports.get()
        box.owed = kind == REPORT
        if kind == END:
            with self.lock:
                self.mailboxes.pop(number, None)
        return kind, payload

    def cancel(self, number: int) -> None:
        """Tune stopped the trial (or it is over): rank 0 stops at its next report. Safe to call twice."""
        with self.lock:
            box = self.mailboxes.pop(number, None)
        if box is not None:
            box.decisions.put(STOP)

    # --- rank 0 of each group
    def take(self, group: int, wait: bool = True) -> Any:
        """The next trial for `group`, NO_TRIAL when none waits (`wait` False), or CLOSED once the search is
        over (`close`): the group's loop returns then.

        A call whose group is gone meanwhile (its node lost while rank 0 waited here: the call lives on in
        this actor with nobody to answer) returns CLOSED and leaves the trials to the live groups."""
        while True:
            try:
                number, job = self.jobs.get(block=wait, timeout=TAKE_POLL_S if wait else None)
            except queue.Empty:
                if wait and group not in self.gone:
                    continue
                return CLOSED if group in self.gone else NO_TRIAL
            if job == CLOSED:
                return CLOSED
            with self.lock:
                if group in self.gone:
                    self.jobs.put((number, job))
                    return CLOSED
                if number in self.mailboxes:   # not cancelled while it waited
                    self.groups.setdefault(group, set()).add(number)
                    return job

    def put_report(self, number: int, metrics: Dict[str, Any], attempt: Optional[int] = None) -> bool:
        """Hand a round's metrics to the trial; True when the trial must stop here (also when `attempt`, the
        run of the trial that reports, is not the trial's current one)."""
        box = self.mailboxes.get(number)
        if box is None or not _same_attempt(box, attempt):
            return True
        box.reports.put((REPORT, metrics))
        return box.decisions.get() == STOP

    def finish(self, group: int, number: int, error: Optional[str], attempt: Optional[int] = None) -> None:
        with self.lock:
            self.groups.get(group, set()).discard(number)
            box = self.mailboxes.get(number)
        if box is not None and _same_attempt(box, attempt):
            self._end(number, error)

    def _end(self, number: int, error: Optional[str]) -> None:
        box = self.mailboxes.get(number)
        if box is not None:
            box.reports.put((END, error))
            box.decisions.put(STOP)   # a put_report of a rank 0 that was lost while it waited returns

    def loop_ended(self, group: int) -> None:
        """Rank 0 of `group`: its loop has ended, every rank past the last collective (after `close`)."""
        with self.lock:
            self.ended.add(group)

    def close(self, timeout: float) -> bool:
        """The search is over: every group's loop returns at its next `take` (no worker dies in it with a
        traceback when the pool is killed). True when all have left or ended within `timeout` seconds; the
        groups' Ray Train runs are not waited for (nothing reads them, and their shutdown is slow)."""
        with self.lock:
            threads = dict(self.threads)
        for _ in threads:
            self.jobs.put((None, CLOSED))
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                waiting = [group for group, thread in threads.items() if thread.is_alive() and group not in self.ended]
            if not waiting or time.monotonic() > deadline:
                return not waiting
            time.sleep(0.02)

    def prestart(self, trials: int, warm) -> None:
        """Start the groups `trials` trials will keep busy now, each loading the base for `warm` (TrialSettings),
        while Tune starts its first trial functions: a group's start (processes, imports, the base) overlaps them."""
        with self.lock:
            self.warm = warm
            self._start_groups_for(trials)

    def _start_groups_for(self, trials: int) -> None:
        # a group per `pack` trials that want one, up to `slots`: groups are started only when needed
        while len(self.groups) < min(self.slots, -(-trials // self.pack)):
            self._start_group()

    def _start_group(self) -> None:
        group, self.started = self.started, self.started + 1
        self.groups[group] = set()
        thread = threading.Thread(target=self._run_group, args=(group,), name=f"group-{group}", daemon=True)
        self.threads[group] = thread
        thread.start()

    def _run_group(self, group: int) -> None:
        import ray
        from ray.train import RunConfig
        from ray.train.torch import TorchTrainer

        _start_autoscaling_coordinator()

        error = None
        try:
            TorchTrainer(serve_packed if self.pack > 1 else serve_trials,
                         train_loop_config={"pool": ray.get_runtime_context().current_actor, "group": group,
                                            "pack": self.pack, "name": self.name, "warm": self.warm},
                         scaling_config=self.scaling,
                         run_config=RunConfig(name=f"{self.name}-group{group}", storage_path=self.storage_path,
                                              storage_filesystem=self.storage_filesystem)).fit()
        except Exception as exc:   # a worker died (or the group could not start): its trial ends with why
            error = failure_reason(exc)
        with self.lock:
            numbers = self.groups.pop(group, set())
            self.gone.add(group)
        for number in numbers:
            self._end(number, error or "its worker group ended while it ran")


def _start_autoscaling_coordinator() -> None:
    """Start the actor that Ray Train's controller asks for resources (and waits on) before it places its
    workers, now, while the controller's own process starts, so a group starts sooner. This is
    Ray's internal API: where a Ray version lacks it, the controller starts the actor itself, as before."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import \
            get_or_create_autoscaling_coordinator
        get_or_create_autoscaling_coordinator()
    except Exception:   # only a speed-up
        pass


def start_pool(spec, storage_path: str, storage_filesystem, name: str, pack: int, trials: int):
    """The search's TrialPool actor (it lives as long as the driver's Ray job or until `ray.kill`); its
    groups' Ray Train runs are `name`-group0, -group1, ... in `storage_path` (RUN_DIR/ray, or the remote one);
    each trains up to `pack` trials at once (search/packing.choose_pack). The groups that
    `trials` trials will keep busy start at once."""
    import ray
    from ray.train import ScalingConfig
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = spec.resources
    scaling = ScalingConfig(
        num_workers=resources.workers_per_trial,
        use_gpu=resources.gpus_per_worker > 0,
        resources_per_worker={"CPU": resources.cpus_per_worker,
                              **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {})},
    )
    slots = spec.search.concurrency
    # threads: each group's rank 0 and each trial function wait inside the actor, plus short calls. On the
    # driver's node, not soft: the pool (and with it every group's controller) must not go with a worker node
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(TrialPool).options(num_cpus=0, max_concurrency=4 * slots * pack + 8, scheduling_strategy=here)
    pool = actor.remote(slots, scaling, storage_path, name, pack, storage_filesystem)
    # the spec's defaults: every trial's base is the same (the model and data settings are not searched)
    pool.prestart.remote(trials, spec.trial_settings({}))
    return pool


# --- on every worker of a group
def serve_trials(config: Dict[str, Any]) -> None:
    """A Ray Train worker's loop: run the pool's trials one after another on one loaded base."""
    import ray
    import ray.train

    from trainers.distributed import broadcast_object

    pool, group = config["pool"], config["group"]
    rank = ray.train.get_context().get_world_rank()
    bases = BaseCache.warmed(config["warm"])
    while True:
        job = ray.get(pool.take.remote(group)) if rank == 0 else None
        job = broadcast_object(job)
        if job == CLOSED:
            if rank == 0:
                ray.get(pool.loop_ended.remote(group))
            return
        error = run_job(job, rank, pool, bases)
        if rank == 0:
            ray.get(pool.finish.remote(group, job.number, error, job.attempt))


def run_job(job: TrialJob, rank: int, pool, bases: "BaseCache") -> Optional[str]:
    """One trial on this worker; returns its failure reason, None when it finished or was stopped.

    Anything but TrialFailed (which every rank raises together) is raised: a rank alone in an error
    would leave the others waiting in a collective, so the group ends and the trial is retried."""
    import ray

    from search.run.tracking import start_trial
    from trainers.checkpoint import has_checkpoint
    from trainers.distributed import all_reduce
    from trainers.errors import TrialFailed
    from trainers.recipe import run_trial

    tracker = start_trial(job.run_dir, job.search_name, job.number, job.params,
                          job.tracking) if rank == 0 else None
    node = ray.get_runtime_context().get_node_id()
    settings, output_dir, remote = job.settings, job.output_dir, job.remote

    def report(metrics: dict) -> None:
        if tracker is not None:
            tracker.log_round(metrics)
        if remote is not None:   # the round's checkpoint (and, after the last, the adapter) is on disk now
            mirror_round(remote, output_dir, job.number)
        stop = ray.get(pool.put_report.remote(job.number, {**metrics, NODE_KEY: node},
                                              job.attempt)) if rank == 0 else False
        if all_reduce([float(stop)], op="max")[0]:   # every rank stops at the same round
            raise TrialStopped()

    if remote is not None:
        restore_from_store(remote, output_dir, job.number)
    state, error = "FAIL", None
    try:
        # a retried trial, or one whose driver died, goes on from its last finished round
        run_trial(settings, report, output_dir, base=bases.get(settings),
                  resume_from=output_dir if has_checkpoint(output_dir) else None)
        state = "COMPLETE"
    except TrialStopped:
        state = "PRUNED"
    except TrialFailed as exc:
        error = exc.reason
    finally:
        if tracker is not None:
            tracker.finish({}, state)
    return error


def mirror_round(remote, output_dir: str, number: int) -> None:
    """After a round, on every rank: the trial directory into the store. Each node uploads its own files (on
    several nodes each holds its ranks' part of a DeepSpeed checkpoint), then rank 0 adds checkpoint/latest,
    so the store never names a round that is there in part. An upload that failed anywhere fails the trial on
    every rank together (TrialFailed): a rank raising alone would leave the others waiting in a collective."""
    from trainers.distributed import all_reduce, barrier, current_context
    from trainers.errors import TrialFailed

    ctx = current_context()
    problem = _transfer_problem(remote.upload_trial, output_dir, number) if ctx.local_rank == 0 else None
    barrier()
    if ctx.is_main and problem is None:
        problem = _transfer_problem(remote.publish_checkpoint, output_dir, number)
    if all_reduce([float(problem is not None)], op="max")[0]:
        raise TrialFailed(problem or f"{KEY}: another node could not upload its part of the trial to "
                                     f"{remote.url('trials')}")


def restore_from_store(remote, output_dir: str, number: int) -> None:
    """A trial retried on a node that never ran it (or whose driver moved): its checkpoint, from the store, on
    each node (one download per node), before any rank looks for it. Without it the trial starts afresh."""
    import logging

    from trainers.checkpoint import has_checkpoint
    from trainers.distributed import barrier, current_context

    if current_context().local_rank == 0 and not has_checkpoint(output_dir):
        problem = _transfer_problem(remote.restore_trial, output_dir, number)
        if problem:   # a lost checkpoint costs the rounds it held, not the trial
            logging.getLogger("peft_search").warning(f"trial {number}: {problem}; starting from its first round")
    barrier()


def _transfer_problem(transfer, output_dir: str, number: int) -> Optional[str]:
    """None when `transfer(output_dir, number)` worked, else one line saying what failed."""
    try:
        transfer(output_dir, number)
    except OSError as exc:   # pyarrow's S3 and network errors
        return f"{KEY}: {transfer.__name__} of trial {number} failed: {one_line(exc)}"
    return None


def serve_packed(config: Dict[str, Any]) -> None:
    """A one-worker group's loop with packing: up to `pack` trials train together on one base
    (trainers/packing/pack.py), each reporting its own rounds; a member that ends or that Tune stops leaves the pack
    and the next trial takes its place at once. Packed trials keep no round checkpoints: one interrupted
    starts again from its first round. The group's steps are measured per pack size (StepMeter) for the
    report's Packing section."""
    import ray

    from search.run.tracking import start_trial
    from search.store.packing_file import record_measured
    from trainers.memory_guard import host_memory_cap
    from trainers.packing.pack import Pack
    from trainers.packing.probe import StepMeter

    pool, group, size = config["pool"], config["group"], config["pack"]
    node = ray.get_runtime_context().get_node_id()
    bases, pack, meter, jobs, trackers = BaseCache.warmed(config["warm"]), None, None, {}, {}

    def leave(number, state, error=None):
        pack.remove(number)
        trackers.pop(number).finish({}, state)
        record_measured(jobs[number].run_dir, config["name"], group, meter)
        ray.get(pool.finish.remote(group, number, error, jobs[number].attempt))
        jobs.pop(number)

    while True:
        while len(jobs) < size:   # fill the free places; wait for a trial only when nothing trains
            job = ray.get(pool.take.remote(group, wait=not jobs))
            if job == CLOSED:   # the search is over: a member still here was stopped before its next report
                for number in list(jobs):
                    leave(number, "PRUNED")
                ray.get(pool.loop_ended.remote(group))
                return
            if job == NO_TRIAL:
                break
            number = job.number
            if pack is None:
                pack = Pack(bases.get(job.settings))
                meter = meter or StepMeter(pack.device)
            try:
                pack.add(number, job.settings)
            except ValueError as exc:
                ray.get(pool.finish.remote(group, number, str(exc), job.attempt))
                continue
            jobs[number] = job
            trackers[number] = start_trial(job.run_dir, job.search_name, number, job.params, job.tracking)
        try:
            with host_memory_cap(jobs[next(iter(jobs))].settings.engine.host_memory_mb):
                result = meter.step(pack)
        except MemoryError as exc:   # the pack as a whole outgrew the host: every member fails with it
            members = list(jobs)
            for number in members:
                leave(number, "FAIL", f"out of memory with {len(members)} trials packed: {exc}")
            pack.close()
            pack = None
            continue
        for number, reason in result.failed.items():
            leave(number, "FAIL", reason)
        for number in result.round_ends:
            metrics = pack.evaluate(number)
            finished = pack.members[number].finished
            if finished:
                metrics.update(pack.save(number, jobs[number].output_dir, metrics))
                if jobs[number].remote is not None:   # one worker: no collective to keep in step
                    problem = _transfer_problem(jobs[number].remote.upload_trial, jobs[number].output_dir,
                                                number)
                    if problem:
                        leave(number, "FAIL", problem)
                        continue
            trackers[number].log_round(metrics)
            stop = ray.get(pool.put_report.remote(number, {**metrics, NODE_KEY: node}, jobs[number].attempt))
            if finished or stop:
                leave(number, "COMPLETE" if finished else "PRUNED")
        if not jobs:
            pack.close()   # the base goes back clean, as a solo trial would leave it
            pack = None


class BaseCache:
    """The base model a worker keeps between trials: loaded again only when a trial needs another one."""

    def __init__(self):
        self.key, self.base = None, None

    @classmethod
    def warmed(cls, settings) -> "BaseCache":
        """A cache holding the base for `settings` already (None: empty), loaded before the group takes a trial."""
        cache = cls()
        if settings is not None:
            try:
                cache.get(settings)
            except Exception:   # not fatal here (get left the cache empty): the first trial loads it and fails with why
                import logging

                logging.getLogger("peft_search").warning("the worker could not load its base ahead of the "
                                                         "first trial", exc_info=True)
        return cache

    def get(self, settings):
        """The loaded base for `settings`, or None where the recipe must load its own (ZeRO-3)."""
        from trainers.engine import uses_deepspeed
        from trainers.model import load_lent_base

        if uses_deepspeed(settings.engine) and settings.engine.zero_stage == 3:
            # ZeRO-3 partitions the base's own weights into the trial's engine: not reusable after it
            self.key = self.base = None
            return None
        key = (settings.model, settings.data)
        if key != self.key:
            self.key = self.base = None
            gc.unfreeze()   # the old base may be collected now
            gc.collect()
            self.base = load_lent_base(settings)
            self.key = key
            _freeze_what_lives_on(settings)
        return self.base


def _freeze_what_lives_on(settings) -> None:
    """Move every object alive now (the libraries, the base) out of the cycle collector's sight.

    Each trial ends with gc.collect() to free its engine at once, and a full collection walks every tracked
    object: with torch, transformers, PEFT and DeepSpeed loaded, that is most of a short trial's overhead.
    Frozen, they are skipped; a collection then walks only what trials made.
    The trial-time libraries are imported first so that their objects are frozen too."""
    import peft  # noqa: F401

    from trainers.engine import uses_deepspeed

    if uses_deepspeed(settings.engine):
        import deepspeed  # noqa: F401
    gc.collect()
    gc.freeze()


def _same_attempt(box: _Mailbox, attempt: Optional[int]) -> bool:
    """Whether a group's call for `attempt` concerns the trial's current run (None: any run)."""
    return attempt is None or box.attempt is None or box.attempt == attempt
