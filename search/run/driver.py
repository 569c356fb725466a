"""The search: Ray Tune drives Optuna (in the run directory's storage) and ASHA over the trials.

run_search() prepares the run directory, connects to Ray, runs the Tuner and finishes with the
run directory's outputs (trials.csv, best/, report.md) rebuilt from the Optuna storage. From the moment the run
directory exists, the terminal shows the product's lines only and everything else goes to RUN_DIR/logs/search.log
(search/run/console.py).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from cluster import leftovers, local
from search.report import outputs
from search.run import console
from search.refine.edges import SpaceEdges
from search.run.packing import choose_pack
from search.run.pool import start_pool
from search.run.progress import CancelEndedTrials, ProgressLines
from search.run.resume import (DriverLock, ResumeError, ResumePlan, infrastructure_failures, plan, record_or_check,
                               rerun_infrastructure_failures)
from search.run.schedulers import make_scheduler
from search.run.searcher import PeftOptunaSearch, make_sampler
from search.run.tracking import log_tables
from search.run.trial import tune_trial
from search.store.remote import KEY, RemoteStorageError, one_line
from search.store.rundir import RunPlace, prepare_run_dir, write_run_files
from search.store.storage import StorageError

GROUPS_CLOSE_S = 15
NODE_ID_LABEL = "ray.io/node-id"   # the label Ray 2.60 gives every node: its node id

log = logging.getLogger("peft_search")


def run_search(spec, runs_dir: str, address: Optional[str] = None, resume: bool = False) -> str:
    """Run the whole search, or with `resume` continue the one in RUNS_DIR/<name> (search/run/resume.py);
    returns the run directory."""
    from search.run.tracking import check_available

    check_available(spec.tracking)  # a missing wandb fails here, not in every trial
    place = RunPlace.of(spec, runs_dir)
    run_dir, remote = place.run_dir, place.remote
    summary = prepare_run_dir(spec, place, resume)
    with DriverLock(run_dir), console.capture(run_dir, quiet=_input_problems()):
        study = open_study(spec, place, resume)   # a changed space or objective stops here, before Ray
        write_run_files(spec, run_dir, summary)
        if remote is not None:   # now, not only at the end: a second search of this name is refused from here on
            try:
                remote.upload_outputs(run_dir)
            except OSError as exc:   # e.g. credentials that may read the bucket but not write it
                raise RemoteStorageError(f"{KEY}: cannot write to {remote.url()}: {one_line(exc)}") from None
        todo = plan(study, spec.search.trials)
        if todo.asked:
            log.info(f"resuming: {todo.finished} trials finished and kept, {len(todo.interrupted)} interrupted "
                     f"or failed by the cluster (run again from their last checkpoint), {todo.new} new")
        wall_before, started = (outputs.previous_wall(run_dir) or 0.0) if resume else 0.0, time.time()
        try:
            if todo.to_run:
                _fit_on_ray(spec, place, address, todo)
            failed_on_cluster = infrastructure_failures(study)
            if failed_on_cluster:
                log.warning(f"{len(failed_on_cluster)} trials failed only because of the cluster (lost nodes or "
                            f"workers, or the trial pool): {failed_on_cluster}; `peft-search resume {run_dir}` "
                            f"runs them again")
        finally:
            rows = outputs.refresh(run_dir, wall_s=wall_before + time.time() - started, storage=spec.storage)
            log_tables(run_dir, spec.name, spec.tracking, {"trials": rows, **_sensitivity_tables(spec, study, rows)})
    return run_dir


def _input_problems() -> tuple:
    """The errors the CLI reports as invalid input (one line, exit 2): no log tail for them on the terminal."""
    from search.store.rundir import RunDirError
    from trainers.records import DataError

    return RunDirError, ResumeError, StorageError, RemoteStorageError, DataError


def open_study(spec, place: RunPlace, resume: bool):
    """The search's Optuna study, created with its fingerprint or, on resume, loaded and checked against it."""
    import optuna

    name = place.study
    directions = ["maximize" if mode == "max" else "minimize" for mode in spec.objective.modes]
    study = optuna.create_study(storage=place.open_storage(), study_name=name,
                                directions=directions, load_if_exists=True)
    if not resume and study.get_trials(deepcopy=False):
        raise StorageError(f"storage: already holds a study {name!r} with trials; resume it or use another storage")
    record_or_check(study, spec)
    rerun = rerun_infrastructure_failures(study) if resume else []
    if rerun:   # RUNNING again, as interrupted trials are; loaded again, past the cache of their FAIL state
        log.info(f"trials {rerun} failed only because of the cluster: they run again")
        study = optuna.load_study(storage=place.open_storage(), study_name=name)
    return study


def _fit_on_ray(spec, place: RunPlace, address: Optional[str], todo: ResumePlan) -> None:
    import ray

    run_dir = place.run_dir
    # A failing trial reports only its reason; Tune's strict check would turn that into a
    # driver-side error instead of a FAIL row.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's own per-trial result files (JSON, CSV, TensorBoard): the Optuna storage is the search's record,
    # and writing them cost every report of every trial a file write or three
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # ...which Tune reads back after the search, unasked, warning of each trial's missing files (nothing reads them)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    cpus_per_trial = spec.resources.workers_per_trial * spec.resources.cpus_per_worker
    stopped = leftovers.stop_leftovers(run_dir)
    if stopped:
        log.info(f"stopped {stopped} processes left by the previous driver's embedded Ray")
    started_ray = local.connect(address, spec.search.concurrency, cpus_per_trial)
    if started_ray:
        leftovers.record(run_dir, ray.get_runtime_context().gcs_address)
    elif not spec.resources.storage_path and sum(1 for node in ray.nodes() if node.get("Alive")) > 1:
        log.info(f"{run_dir} must be on storage every node of the cluster sees (NFS, EFS), or set "
                 f"resources.storage_path: a trial retried on another node goes on from its checkpoint only there")
    try:
        _fit(spec, place, todo)
    finally:
        local.shutdown(started_ray)
        if started_ray:
            leftovers.forget(run_dir)


def _sensitivity_tables(spec, study, rows) -> dict:
    """The sensitivity table and importances for W&B, on the first objective."""
    if spec.tracking.wandb == "disabled":
        return {}
    from search.refine.sensitivity import summary_tables

    return summary_tables(rows, study, spec.objective.metrics[0], spec.objective.modes[0])


def _fit(spec, place: RunPlace, todo: ResumePlan) -> None:
    import ray
    from ray import tune

    threads = local.threads_per_worker(spec.search.concurrency, spec.resources.workers_per_trial)
    storage_path, storage_filesystem = place.ray_storage()
    tune_name = _tune_name(place)
    pack = choose_pack(spec, place.run_dir, threads, resumed=todo.asked > 0)   # search.pack, or the cost model's K
    # worker groups that outlive trials, started first: their start (processes, imports, the base) is the
    # longest wait of a search's start, and the rest of it overlaps theirs
    pool = start_pool(spec, storage_path, storage_filesystem, tune_name, pack, todo.to_run)
    try:
        metric, mode = spec.objective.metric, spec.objective.mode
        if not isinstance(metric, str):   # several objectives: Ray's OptunaSearch wants lists
            metric, mode = list(metric), list(mode)
        scheduler = make_scheduler(spec.search.scheduler, metric, mode, spec.max_rounds, spec.search.grace_rounds,
                                   spec.search.reduction_factor)
        edges = SpaceEdges(spec.space, spec.peft.method) if isinstance(metric, str) else None   # one best only
        trainable = tune.with_parameters(tune_trial, spec=spec, place=place, threads_per_worker=threads,
                                         pool=pool)
        tuner = tune.Tuner(
            # the trial function only waits on its worker group, which holds the real resources; its actor
            # is reused for the next trial (one process start less per trial). On the driver's node, with the
            # pool: a lost worker node then takes no trial function, only workers, whose trials are retried
            tune.with_resources(trainable, tune.PlacementGroupFactory(
                [{"CPU": 0.01}], bundle_label_selector=[{NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}])),
            tune_config=tune.TuneConfig(search_alg=_searcher(spec, place, todo, metric, mode), scheduler=scheduler,
                                        num_samples=todo.to_run, max_concurrent_trials=spec.search.concurrency * pack,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=tune_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                      verbose=0,
                                      # retries happen inside the trial function (search/run/trial.py), which
                                      # lives on the driver's node: a restart by Tune would only repeat a fault
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[ProgressLines(metric, mode, todo.to_run, edges=edges),
                                                 CancelEndedTrials(pool)]),
        )
        tuner.fit()
        _close_groups(pool)
    finally:
        ray.kill(pool)   # with whatever worker groups are left


def _searcher(spec, place: RunPlace, todo: ResumePlan, metric, mode) -> PeftOptunaSearch:
    from search.refine.refiner import Refiner

    has_defaults = bool(spec.default_params())   # some published default lies inside the space
    return PeftOptunaSearch(
        space=spec.search_space(), metric=metric, mode=mode,
        # a resumed driver's sampler must not replay the draws of the first driver's (same seed, same draws)
        sampler=make_sampler(spec.search.algorithm, spec.search.seed + todo.asked,
                             grid=spec.grid() if spec.search.algorithm == "grid" else None),
        study_name=place.study, storage=place.open_storage(),
        seed=spec.search.seed,
        decode=spec.decode,
        refiner=Refiner.from_spec(spec),   # None unless search.refine_every > 0
        # trial 0 tries the published defaults (rank 8, alpha 2r, lr 2e-4, ...) where they lie in the space
        points_to_evaluate=[spec.default_params(complete=True)] if has_defaults and not todo.asked else None,
        resume=todo.interrupted,
    )


def _close_groups(pool) -> None:
    """Let the worker groups' loops end before the pool is killed (a group killed in its loop prints a worker's
    traceback); one still busy after GROUPS_CLOSE_S is killed with the pool."""
    import ray

    try:
        ray.get(pool.close.remote(timeout=GROUPS_CLOSE_S), timeout=GROUPS_CLOSE_S + 10)
    except ray.exceptions.GetTimeoutError:
        pass
    except ray.exceptions.RayActorError as exc:   # its trials were recorded as failed by the cluster already
        log.warning(f"the trial pool was lost: {one_line(exc)}")


def _tune_name(place: RunPlace) -> str:
    """`tune` for the first driver, `tune-2`, `tune-3`... for the ones that resumed it."""
    taken = (lambda name: place.remote.exists("ray", name)) if place.remote else \
        (lambda name: os.path.exists(os.path.join(place.run_dir, "ray", name)))
    name, count = "tune", 1
    while taken(name):
        count += 1
        name = f"tune-{count}"
    return name

