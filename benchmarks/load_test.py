"""Load test: many short trials at high concurrency, every trial accounted for, the driver's memory bounded.

A tiny BERT classifier (2 layers, 64 wide) with LoRA, 2 optimizer steps in 2 eval rounds per trial (so
ASHA can stop trials after their first round), 16 eval rows. One learning rate in the space diverges,
so the search sees COMPLETE, PRUNED and FAIL trials alike. It runs through the product exactly as
`peft-search run` does (`search.run.driver.run_search`, embedded Ray) in this process, so this process is
the driver: a background thread samples its RSS every time the count of finished trials in the Optuna
storage goes up.

    python benchmarks/load_test.py [--trials 200] [--concurrency 8] [--scheduler asha] [--deepspeed]

Afterwards it checks that trials.csv has exactly N rows and the Optuna study exactly N trials, all
finished (COMPLETE / PRUNED / FAIL), numbered 0..N-1 with none missing or twice, and that the driver's
RSS grows by less than RSS_BOUND_KIB_PER_TRIAL per trial over the second half of the search. Prints the
figures and, as its last line, one JSON object; writes benchmarks/results/load_test.json.

DeepSpeed is off by default: it costs each worker several CPU-seconds of import and engine set-up and
nothing in the driver, whose bookkeeping is what this measures (`--deepspeed` turns it on).

The results file is rewritten after every finished trial (`"complete": false`), so a long run stopped early
(`kill -USR1 PID`: Ray Tune ends the search gracefully, the run directory is finished as usual) still leaves
its figures; the accounting then lists the trials that never ran.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sqlite3
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "load_test.json")
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")
# The bound on the driver's growth. Ray Tune keeps every trial object (config, last result) and Optuna's
# sampler every FrozenTrial in the driver, a few KiB to some tens of KiB each; 1 MiB per trial leaves
# ample room for that and still keeps a 1,000-trial search under 1 GiB of growth on a small head node.
# A real leak (a model, a dataset, a tokenizer or a Ray object kept per trial) is several MiB per trial.
RSS_BOUND_KIB_PER_TRIAL = 1024.0
# Fewer points than this and one allocation (a reply, a thread's stack, a malloc arena) decides the slope.
MIN_SAMPLES_FOR_BOUND = 10
KIB = 1024


def build_spec(workdir: str, trials: int, concurrency: int, scheduler: str = "asha",
               deepspeed: bool = False) -> str:
    """Write the tiny model, the data and the spec under `workdir`; returns the spec's path."""
    import yaml

    from trainers.tiny_models import build_tiny_classifier, make_learnable_classification_data

    model = build_tiny_classifier(os.path.join(workdir, "tiny-bert"), num_labels=2)
    train = make_learnable_classification_data(os.path.join(workdir, "train.jsonl"), 32, seed=1)
    evals = make_learnable_classification_data(os.path.join(workdir, "eval.jsonl"), 16, seed=2)
    spec = {
        "name": "load",
        "model": {"name_or_path": model, "task": "sequence-classification"},
        "data": {"train": train, "eval": evals, "text_field": "text", "label_field": "label", "max_length": 16},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        # 1e9 diverges at its second step: those trials end FAIL (or PRUNED, if ASHA stops them first)
        "space": {"r": [1, 2, 4, 8], "learning_rate": [1e-3, 5e-3, 2e-2, 1e9]},
        # 2 epochs of 1 step each: two eval rounds, the shortest trial ASHA can stop halfway
        "training": {"epochs": 2, "batch_size": 16, "max_steps": 2},
        "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"algorithm": "tpe", "trials": trials, "concurrency": concurrency, "scheduler": scheduler,
                   "evals_per_epoch": 1, "grace_rounds": 1, "seed": 0},
        "resources": {"workers_per_trial": 1, "deepspeed": {"enabled": deepspeed}},
        "tracking": {"wandb": "disabled"},
    }
    path = os.path.join(workdir, "load.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(spec, handle, sort_keys=False)
    return path


def count_finished(sqlite_path: str) -> Optional[int]:
    """Finished trials in the Optuna SQLite file, read with plain sqlite3 (read-only, a short read) so the
    sampler adds next to nothing to the RSS it measures; None while the study does not exist yet."""
    if not os.path.isfile(sqlite_path):
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True, timeout=5)) as db:
            marks = ",".join("?" * len(FINISHED_STATES))
            return db.execute(f"SELECT COUNT(*) FROM trials WHERE state IN ({marks})", FINISHED_STATES).fetchone()[0]
    except sqlite3.Error:   # the tables are being created, or a write holds the lock: try again later
        return None


class RssSampler(threading.Thread):
    """Samples this process's RSS (and the resident size of Ray's own gcs_server and raylet) whenever the
    number of finished trials goes up; polls the study every `poll_s` seconds."""

    def __init__(self, sqlite_path: str, poll_s: float = 0.5, on_sample: Optional[Callable[[list], None]] = None):
        super().__init__(name="rss-sampler", daemon=True)
        import psutil

        self.process = psutil.Process()
        self.sqlite_path = sqlite_path
        self.poll_s = poll_s
        self.on_sample = on_sample   # e.g. writes the figures so far, so a run stopped early still leaves them
        self.samples: List[Dict[str, float]] = []   # {finished, rss_kib, ray_kib, t}
        self.stopped = threading.Event()
        self.started_at = time.time()

    def sample(self, finished: int) -> None:
        self.samples.append({"finished": finished, "rss_kib": self.process.memory_info().rss / KIB,
                             "ray_kib": self._ray_system_kib(), "t": round(time.time() - self.started_at, 2)})

    def _ray_system_kib(self) -> float:
        """gcs_server + raylet (ray.init starts both as children of the driver): they keep per-trial state
        (actors, placement groups, task events) for the whole run."""
        import psutil

        total = 0.0
        for child in self.process.children():
            try:
                if child.name() in ("gcs_server", "raylet"):
                    total += child.memory_info().rss / KIB
            except psutil.Error:   # a child that exited between the listing and the read
                continue
        return total

    def run(self) -> None:
        last = 0
        while not self.stopped.wait(self.poll_s):
            finished = count_finished(self.sqlite_path)
            if finished is not None and finished > last:
                last = finished
                self.sample(finished)
                if self.on_sample is not None:
                    self.on_sample(self.samples)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)


def slope_kib_per_trial(samples: List[Dict[str, float]], key: str = "rss_kib") -> Optional[float]:
    """Least-squares slope of `key` against the finished-trial count (KiB per trial)."""
    if len(samples) < 2:
        return None
    xs = [s["finished"] for s in samples]
    ys = [s[key] for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var_x = sum((x - mean_x) ** 2 for x in xs)
    if var_x == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var_x


def check_accounting(run_dir: str, trials: int) -> Tuple[List[str], Dict[str, int]]:
    """Every trial in trials.csv and in the Optuna study, once, finished, numbered 0..N-1, states agreeing.
    Returns (problems, counts of each state in the study)."""
    from search.store.results import load_study
    from search.store.storage import open_storage

    problems = []
    with open(os.path.join(run_dir, "trials.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    study_trials = load_study(open_storage("sqlite", run_dir)).get_trials(deepcopy=False)
    expected = list(range(trials))
    for where, numbers in (("trials.csv", [int(r["number"]) for r in rows]),
                           ("study", [t.number for t in study_trials])):
        if len(numbers) != trials:
            problems.append(f"{where}: {len(numbers)} trials, expected {trials}")
        if sorted(numbers) != expected:
            missing = sorted(set(expected) - set(numbers))
            twice = sorted({n for n in numbers if numbers.count(n) > 1})
            problems.append(f"{where}: numbers are not 0..{trials - 1}: missing {missing[:10]}, twice {twice[:10]}")
    study_states = {t.number: t.state.name for t in study_trials}
    unfinished = {n: s for n, s in study_states.items() if s not in FINISHED_STATES}
    if unfinished:
        problems.append(f"study: trials not finished: {dict(list(unfinished.items())[:10])}")
    disagree = [r["number"] for r in rows if study_states.get(int(r["number"])) != r["state"]]
    if disagree:
        problems.append(f"trials.csv: state differs from the study for trials {disagree[:10]}")
    counts = {state: sum(1 for s in study_states.values() if s == state) for state in sorted(set(study_states.values()))}
    return problems, counts


def memory_figures(samples: List[Dict[str, float]], trials: int, start_kib: float) -> dict:
    """RSS at start, after 10% of the trials and at the end; slopes over the second half."""
    def first_at(count: float) -> Optional[float]:
        return next((s["rss_kib"] for s in samples if s["finished"] >= count), None)

    second_half = [s for s in samples if s["finished"] >= trials / 2]
    slope = slope_kib_per_trial(second_half)
    ray_slope = slope_kib_per_trial(second_half, "ray_kib")
    # from 10% on: Ray's and the libraries' one-off start-up allocations are behind, only per-trial growth is left
    warm = [s for s in samples if s["finished"] >= math.ceil(trials / 10)]
    after_warmup = slope_kib_per_trial(warm)
    # judged on the second half; a run stopped before it, on what it has from 10% on; too few points: not at all
    judged = slope if len(second_half) >= MIN_SAMPLES_FOR_BOUND else \
        after_warmup if len(warm) >= MIN_SAMPLES_FOR_BOUND else None
    return {
        "rss_start_mib": round(start_kib / KIB, 1),
        "rss_after_10pct_mib": _mib(first_at(math.ceil(trials / 10))),
        "rss_end_mib": _mib(samples[-1]["rss_kib"] if samples else None),
        "rss_growth_kib_per_trial_second_half": None if slope is None else round(slope, 1),
        "rss_growth_kib_per_trial_after_10pct": None if after_warmup is None else round(after_warmup, 1),
        "rss_bound_kib_per_trial": RSS_BOUND_KIB_PER_TRIAL,
        "rss_within_bound": _below_bound(judged),
        "ray_system_rss_end_mib": _mib(samples[-1]["ray_kib"] if samples else None),
        "ray_system_growth_kib_per_trial_second_half": None if ray_slope is None else round(ray_slope, 1),
        "samples": len(samples),
    }


def _curve(samples: List[Dict[str, float]]) -> List[Tuple[int, float, float]]:
    """(finished trials, driver RSS MiB, gcs_server + raylet RSS MiB) per sample."""
    return [(s["finished"], round(s["rss_kib"] / KIB, 1), round(s["ray_kib"] / KIB, 1)) for s in samples]


def _below_bound(slope: Optional[float]) -> Optional[bool]:
    return None if slope is None else slope < RSS_BOUND_KIB_PER_TRIAL


def _mib(kib: Optional[float]) -> Optional[float]:
    return None if kib is None else round(kib / KIB, 1)


def run_load_test(trials: int, concurrency: int, workdir: str, scheduler: str = "asha",
                  deepspeed: bool = False, partial_out: Optional[str] = None) -> dict:
    """Run the search and return its figures, `problems` listing every accounting failure. With `partial_out`,
    the figures so far are written there after every finished trial (`"complete": false`)."""
    import psutil

    from search.run.driver import run_search
    from search.spec.search_spec import load_spec
    from search.store.storage import SQLITE_FILE

    spec = load_spec(build_spec(workdir, trials, concurrency, scheduler, deepspeed))
    runs_dir = os.path.join(workdir, "runs")
    start_kib = psutil.Process().memory_info().rss / KIB
    t0 = time.time()

    def write_partial(samples: list) -> None:
        elapsed = time.time() - t0
        done = samples[-1]["finished"]
        _write_json(partial_out, {"complete": False, "trials": trials, "concurrency": concurrency,
                                  "finished_so_far": done, "elapsed_s": round(elapsed, 1),
                                  "trials_per_hour_so_far": round(done / elapsed * 3600, 1),
                                  **memory_figures(samples, trials, start_kib),
                                  "rss_curve": _curve(samples)})

    sampler = RssSampler(os.path.join(runs_dir, spec.name, SQLITE_FILE),
                         on_sample=write_partial if partial_out else None)
    sampler.start()
    try:
        run_dir = run_search(spec, runs_dir)
    finally:
        wall = time.time() - t0
        sampler.stop()
    problems, states = check_accounting(run_dir, trials)
    finished = sum(states.get(state, 0) for state in FINISHED_STATES)
    # `complete`: the search ran all its trials (a SIGUSR1 / Ctrl-C makes Ray Tune end it early, gracefully)
    figures = {"complete": finished == trials, "trials": trials, "finished": finished, "concurrency": concurrency,
               "scheduler": scheduler, "deepspeed": deepspeed,
               "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "wall_s": round(wall, 1), "trials_per_hour": round(finished / wall * 3600, 1), "states": states,
               **memory_figures(sampler.samples, trials, start_kib), "problems": problems, "run_dir": run_dir}
    figures["rss_curve"] = _curve(sampler.samples)
    return figures


def _write_json(path: str, data: dict) -> None:
    """Written whole to a temporary file first: a reader (or a kill) never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(f"{path}.tmp", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--scheduler", choices=("asha", "none"), default="asha")
    parser.add_argument("--deepspeed", action="store_true", help="trials under DeepSpeed ZeRO-2 (off: plain torch)")
    parser.add_argument("--workdir", default=None, help="where the model, data and run go (default: a temp dir)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="load_test_")
    os.makedirs(workdir, exist_ok=True)
    figures = run_load_test(args.trials, args.concurrency, workdir, args.scheduler, args.deepspeed,
                            partial_out=args.out)
    print(f"{figures['finished']}/{figures['trials']} trials at concurrency {figures['concurrency']}: {figures['wall_s']} s, "
          f"{figures['trials_per_hour']} trials/hour, states {figures['states']}")
    verdict = {True: "within", False: "EXCEEDED", None: "not measured"}[figures["rss_within_bound"]]
    print(f"driver RSS: start {figures['rss_start_mib']} MiB, after 10% {figures['rss_after_10pct_mib']} MiB, "
          f"end {figures['rss_end_mib']} MiB; growth over the second half "
          f"{figures['rss_growth_kib_per_trial_second_half']} KiB/trial, from 10% on "
          f"{figures['rss_growth_kib_per_trial_after_10pct']} KiB/trial (bound {RSS_BOUND_KIB_PER_TRIAL:.0f}: "
          f"{verdict})")
    print("accounting: " + ("every trial accounted for" if not figures["problems"] else "; ".join(figures["problems"])))
    _write_json(args.out, figures)
    print(json.dumps({k: v for k, v in figures.items() if k != "rss_curve"}))
    return 0 if not figures["problems"] and figures["rss_within_bound"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
