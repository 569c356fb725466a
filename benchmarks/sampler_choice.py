"""Which sampler should a search use by default? Random, TPE, Optuna's GP sampler and TPE with refinement,
compared on two real tasks at N = 10 and N = 20 trials, over many seeds, by replaying them against a
table of trained configurations.

Tasks (TASKS below; the spec is benchmarks/sampler_choice.yaml, the space of benchmarks/refinement.yaml):
LoRA on the pretrained MiniLM classifying
- `docstrings`: Python standard library docstrings, 6 classes (examples/data/stdlib_docstrings);
- `manpages`: one-line man page summaries by manual section, 6 classes, short and much more ambiguous
  texts (examples/data/man_page_sections; TF-IDF reaches 0.65 there against 0.86 on the docstrings).
Each is cut to its first rows and a short max_length so that one configuration trains in seconds on CPU.

Method: tabular benchmarking with a surrogate, as Syne Tune's blackbox repository and HPOBench do.
1. `build` trains, per task, a dense design over the space with the real trainer (trainers.recipe.run_trial
   on one MiniLM loaded once, its adapter replaced per configuration, as benchmarks/refinement.py): the
   published defaults (every search's first trial), then a scrambled Sobol sequence (any prefix is
   space-filling, so a build cut by its time budget still covers the space), plus the best few configurations
   retrained with two more training seeds to measure the run-to-run noise. The table is written after every
   configuration to results/sampler_choice_table_<task>.json, and `build` resumes from it.
2. The surrogate between the table's points is a random forest (sklearn) on the unit cube of the sampler's
   own scales (log learning rate, log2 rank, the choice index of alpha_ratio). Why a forest: it is neither of
   the compared models (a GP surrogate would be the GP sampler's own assumption of a smooth objective, a
   Parzen-like one TPE's), it handles the plateaus that training gives (every rate below ~1e-4 scores the
   majority class here) and its cross-validated fit is printed by `build`/`replay` next to a GP regressor's
   and a 1-nearest-neighbour's (Syne Tune's default surrogate) for comparison; `replay --surrogate gp|knn`
   reruns the whole comparison on another one, to see that the verdict does not hang on this choice.
3. Observation noise: each evaluation adds a normal draw whose standard deviation is the one measured between
   the training seeds of the retrained configurations (pooled), scaled by the configuration's gain above
   the plateau of configurations that learn nothing (Surrogate says why), and is rounded to the task's accuracy grid
   (1 / eval rows), so ties happen as in a live search. The draw is a function of the replay seed and the
   configuration: within one seed every arm sees the same objective (the same configuration always scores
   the same, as with a fixed training seed), across seeds the noise differs.
4. `replay` runs every arm, per task and seed, for 2 * max(N) trials with what a search uses: the spec's
   space (Optuna distributions as the searcher asks them), the published defaults enqueued first, the
   product's `make_sampler`, and for the refined arm its RefinedSampler and Refiner (refine_every 5, as
   docs/spec.md's example; the first refinement comes after 10 complete trials). Per N, each arm's best at
   N is the best of its first N trials, and its trials to the target count how many trials it needs to
   reach plain TPE's best at N of the same seed (at most 2N; not reached counts as infinity in medians).

Arms. Candidates for the default: `random`, `tpe` (the product's make_sampler("tpe"): multivariate, 4
startup trials; the product's default before this benchmark, refinement off), `gp` (the product's
make_sampler("gp"): Optuna's GPSampler with 4 startup trials like the product's TPE; Optuna's default of 10
would make it a random search up to N = 10; with no pruned trials in a replay it is Optuna's GPSampler as is),
`tpe+refine`. Shown for reference: `tpe-optuna` (Optuna's own TPE defaults: univariate, 10 startup
trials) and, with `--reference gp-optuna`, Optuna's default GPSampler (10 startup trials; it costs as much
as `gp`).

Fairness: per seed all arms get the same sampler seed, the same objective (noise included) and the same
first trial; each arm's best at N comes from its own first N trials, so running longer for the trials-to-
target count never changes it.

Decision rule (printed): per cell (task, seed, N) the candidates are ranked by best at N (ties share the
mean rank); the candidate with the lowest mean rank over all cells wins. It replaces TPE as the default
only if it also beats TPE run by run: a one-sided paired Wilcoxon signed-rank test at p < 0.05 over the
(task, seed) pairs, of its best at N minus TPE's summed over the two N (N = 10 and 20 are read off the same
runs, so they are one pair, not two). Otherwise TPE stays (a change of default needs evidence).
Refinement is thereby included only if tpe+refine wins that way.

`check` runs a few live searches through the CLI (`peft-search run`, embedded Ray, the same cut data) with
the default's algorithm and TPE (or, when the default stays TPE, the two arms given), and compares their best
at N with the table's medians.

On a 2-core machine shared with test runs, the results were made with (one build per task, in parallel,
each single-threaded; build stops at its time budget and resumes from the table when run again):

    nice -n 19 python benchmarks/sampler_choice.py build --tasks docstrings --minutes 40 &
    nice -n 19 python benchmarks/sampler_choice.py build --tasks manpages --minutes 40 &
    nice -n 19 python benchmarks/sampler_choice.py replay --seeds 10 --jobs 3
    nice -n 19 python benchmarks/sampler_choice.py replay --seeds 5 --jobs 3 --surrogate gp --reference
    nice -n 19 python benchmarks/sampler_choice.py check --task docstrings --trials 10 --seeds 0 --arms tpe random
    nice -n 19 python benchmarks/sampler_choice.py check --task docstrings --trials 10 --seeds 0 1 --arms gp tpe

Options: build [--points 96] [--replicates 3] [--replicate-after 24]; replay [--tasks ...] [--surrogate
forest|gp|knn] [--reference tpe-optuna gp-optuna]; check [--task] [--trials] [--seeds] [--arms A B].

Writes benchmarks/results/sampler_choice_table_<task>.json (build), sampler_choice.json and
sampler_choice.svg (replay; sampler_choice_<surrogate>.json / .svg for another surrogate) and
sampler_choice_check_<arm>_<arm>.json (check).
"""
import argparse
import csv
import hashlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SPEC = os.path.join(HERE, "sampler_choice.yaml")
RESULTS = os.path.join(HERE, "results")


@dataclass(frozen=True)
class Task:
    train: str
    eval: str
    train_rows: int      # the first rows of each file: one epoch is train_rows / 16 steps
    eval_rows: int       # also the accuracy grid: 1 / eval_rows
    max_length: int


DATA = os.path.join(ROOT, "examples", "data")
TASKS = {
    # 16 steps at 32 tokens (the docstrings' median is 25 tokens)
    "docstrings": Task(os.path.join(DATA, "stdlib_docstrings", "train.jsonl"),
                       os.path.join(DATA, "stdlib_docstrings", "eval.jsonl"), 256, 320, 32),
    # 24 steps at 16 tokens (the summaries' p90 is 14 tokens); all 327 eval rows
    "manpages": Task(os.path.join(DATA, "man_page_sections", "train.jsonl"),
                     os.path.join(DATA, "man_page_sections", "eval.jsonl"), 384, 327, 16),
}
NS = (10, 20)
CANDIDATES = ("random", "tpe", "gp", "tpe+refine")
REFERENCE_ARMS = ("tpe-optuna", "gp-optuna")
REPLICATE_SEEDS = (1, 2)   # training seeds of the retrained configurations (the table's own is the spec's, 0)


# --- the product's modules, before and after the search/ package was split into subpackages --------------
def _first(*candidates):
    """The first importable (module, attribute) of `candidates`."""
    import importlib

    for module, name in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {candidates} is importable")


def product():
    """load_spec, make_sampler, RefinedSampler, Refiner and the search section's defaults."""
    return {
        "load_spec": _first(("search.spec.search_spec", "load_spec"), ("search.spec", "load_spec")),
        "make_sampler": _first(("search.run.searcher", "make_sampler"), ("search.searcher", "make_sampler")),
        "RefinedSampler": _first(("search.refine.sampler", "RefinedSampler"), ("search.run.searcher", "RefinedSampler"),
                                 ("search.searcher", "RefinedSampler")),
        "Refiner": _first(("search.refine.refiner", "Refiner"), ("search.refine", "Refiner")),
        "SearchSection": _first(("search.spec.sections", "SearchSection"), ("search.spec_sections", "SearchSection")),
    }


def load_task(name: str, workdir: str):
    """The spec with the task's data cut to its first rows, written under `workdir`."""
    task = TASKS[name]
    spec = product()["load_spec"](SPEC)
    cut = {}
    for split, source, rows in (("train", task.train, task.train_rows), ("eval", task.eval, task.eval_rows)):
        cut[split] = os.path.join(workdir, f"{name}_{split}.jsonl")
        with open(source, encoding="utf-8") as src, open(cut[split], "w", encoding="utf-8") as dst:
            dst.writelines(line for _, line in zip(range(rows), src))
    data = replace(spec.data, train=cut["train"], eval=cut["eval"], max_length=task.max_length)
    return replace(spec, data=data)


def read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def table_path(task: str) -> str:
    return os.path.join(RESULTS, f"sampler_choice_table_{task}.json")


# --- the space as a unit cube: the design's coordinates and the surrogate's inputs ------------------------
def from_unit(dist, u: float):
    """The value of an Optuna distribution at u in [0, 1) on the sampler's scale."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
    if isinstance(dist, FloatDistribution):
        if dist.log:
            return float(f"{math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low))):.6g}")
        return float(f"{dist.low + u * (dist.high - dist.low):.6g}")
    values = list(range(dist.low, dist.high + 1, dist.step or 1))   # IntDistribution (r_log2)
    return values[min(int(u * len(values)), len(values) - 1)]


def to_unit(dist, value) -> float:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return dist.choices.index(value) / max(1, len(dist.choices) - 1)
    if getattr(dist, "log", False):
        return (math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low))
    return (value - dist.low) / (dist.high - dist.low)


def design(space: dict, count: int, seed: int) -> list[dict]:
    from scipy.stats import qmc

    points = qmc.Sobol(d=len(space), scramble=True, seed=seed).random(count)
    return [{name: from_unit(dist, u) for (name, dist), u in zip(space.items(), row)} for row in points]


# --- build: the table -----------------------------------------------------------------------------------
class Trainer:
    """Trains configurations of one task on a MiniLM loaded once per training seed."""

    def __init__(self, spec, workdir: str):
        self.spec, self.workdir, self.bases = spec, workdir, {}

    def base(self, seed: int):
        from trainers.data import read_trial_rows
        from trainers.model import load_base
        from trainers.recipe import seed_everything

        if seed not in self.bases:
            settings = self.spec.trial_settings({})
            seed_everything(seed)   # the classification head is initialised from torch's RNG: per seed
            labels = read_trial_rows(settings.data, settings.model.task).labels
            self.bases[seed] = load_base(settings.model, num_labels=len(labels))
        return self.bases[seed]

    def __call__(self, params: dict, seed: int):
        """(eval accuracy or None when the trial failed, wall seconds, CPU seconds)."""
        from trainers.errors import TrialFailed
        from trainers.recipe import run_trial

        settings = self.spec.trial_settings(params)
        # one torch thread: build runs one niced process per task on a shared 2-core machine, where a
        # preempted second thread stalls every parallel op (the results do not depend on it)
        settings = replace(settings, training=replace(settings.training, seed=seed),
                           engine=replace(settings.engine, num_threads=1))
        started, cpu = time.time(), time.process_time()
        try:
            final = run_trial(settings, lambda metrics: None, os.path.join(self.workdir, "trial"),
                              base=self.base(seed))
            value = final[self.spec.objective.metric]
        except TrialFailed:   # diverged: a FAIL row in a search
            value = None
        return value, round(time.time() - started, 2), round(time.process_time() - cpu, 2)


def build(args):
    """Train the design of every task, interleaved (a time cut leaves the tables equally dense), then the
    replicates of the best configurations, then the rest of the design; resumable from the tables."""
    from optuna.distributions import distribution_to_json

    workdir = tempfile.mkdtemp(prefix="sampler_choice_build_")
    tables, trainers, plans = {}, {}, {}
    for name in args.tasks:
        spec = load_task(name, workdir)
        space = spec.search_space()
        path = table_path(name)
        table = read_json(path) if os.path.exists(path) else {
            "task": name, "task_settings": asdict(TASKS[name]) | {"train": os.path.relpath(TASKS[name].train, ROOT),
                                                                 "eval": os.path.relpath(TASKS[name].eval, ROOT)},
            "space": {k: distribution_to_json(v) for k, v in space.items()}, "metric": spec.objective.metric,
            "design": f"published defaults, then scrambled Sobol (scipy.stats.qmc, seed {args.design_seed})",
            "points": []}
        tables[name], trainers[name] = table, Trainer(spec, workdir)
        points = [("defaults", 0, spec.default_params(complete=True))]
        points += [("sobol", i, p) for i, p in enumerate(design(space, args.points, args.design_seed))]
        plans[name] = points

    def done(table, kind, index, seed):
        return any(p["kind"] == kind and p["index"] == index and p["seed"] == seed for p in table["points"])

    def train(name, kind, index, params, seed):
        if done(tables[name], kind, index, seed):
            return
        value, seconds, cpu = trainers[name](params, seed)
        tables[name]["points"].append({"kind": kind, "index": index, "seed": seed, "params": params,
                                       "value": value, "train_s": seconds, "cpu_s": cpu})
        with open(table_path(name) + ".tmp", "w") as handle:   # written whole, then moved: never half a table
            json.dump(tables[name], handle, indent=1)
        os.replace(table_path(name) + ".tmp", table_path(name))
        print(f"{name} {kind} {index} seed {seed}: {value} ({seconds} s, {cpu} s CPU)", flush=True)

    started = time.time()

    def time_left():
        return time.time() - started < args.minutes * 60

    order = []   # (task, kind, index, params, seed)
    for i in range(args.replicate_after + 1):
        order += [(n, *plans[n][i], 0) for n in args.tasks if i < len(plans[n])]
    order.append("replicates")
    for i in range(args.replicate_after + 1, args.points + 1):
        order += [(n, *plans[n][i], 0) for n in args.tasks if i < len(plans[n])]
    for item in order:
        if not time_left():
            print(f"time budget of {args.minutes} min spent: stopping (run build again to go on)")
            break
        if item == "replicates":
            for name in args.tasks:
                design_rows = [p for p in tables[name]["points"] if p["seed"] == 0 and p["value"] is not None]
                for p in sorted(design_rows, key=lambda p: -p["value"])[:args.replicates]:
                    for seed in REPLICATE_SEEDS:
                        if time_left():
                            train(name, p["kind"], p["index"], p["params"], seed)
            continue
        train(*item)
    for name in args.tasks:
        table = tables[name]
        table["noise_sd"] = replicate_noise(table)
        table["train_s_mean"] = round(statistics.mean(p["train_s"] for p in table["points"]), 2)
        with open(table_path(name), "w") as handle:
            json.dump(table, handle, indent=1)
        print(f"{name}: {len(table['points'])} trainings, noise sd {table['noise_sd']}, "
              f"{table['train_s_mean']} s per training")
        print(surrogate_quality(table))


def replicate_groups(table) -> dict[tuple, list]:
    """(kind, index) -> the values of every training seed, for the configurations trained more than once."""
    groups: dict[tuple, list] = {}
    for p in table["points"]:
        if p["value"] is not None:
            groups.setdefault((p["kind"], p["index"]), []).append(p["value"])
    return {k: v for k, v in groups.items() if len(v) > 1}


def replicate_noise(table) -> float | None:
    """The median, over the retrained configurations, of their standard deviation between training seeds.
    The median rather than a pooled value: a configuration that sometimes fails to train (manpages: 0.43 at
    one seed, 0.21 and 0.16 at the others) would set the noise of every configuration by itself."""
    groups = replicate_groups(table)
    if not groups:
        return None
    return round(statistics.median(statistics.stdev(v) for v in groups.values()), 4)


# --- the surrogate ----------------------------------------------------------------------------------------
def surrogate_model(kind: str):
    if kind == "forest":
        from sklearn.ensemble import RandomForestRegressor

        # all features at each split: 5 dimensions of which one or two matter; leaves of 2 average the
        # table's own training noise a little
        return RandomForestRegressor(n_estimators=300, min_samples_leaf=2, max_features=None, random_state=0)
    if kind == "gp":
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
        kernel = ConstantKernel() * Matern(length_scale=[0.3] * 5, length_scale_bounds=(0.01, 100), nu=2.5) \
            + WhiteKernel(1e-3, (1e-6, 1e-1))
        return GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=3, random_state=0)
    if kind == "knn":
        from sklearn.neighbors import KNeighborsRegressor
        return KNeighborsRegressor(n_neighbors=1)
    raise ValueError(kind)


def table_xy(table, space):
    """Design rows of training seed 0 as (unit-cube X, y); a failed trial scores the table's worst value."""
    import numpy as np

    rows = [p for p in table["points"] if p["seed"] == 0]
    worst = min(p["value"] for p in rows if p["value"] is not None)
    x = np.array([[to_unit(dist, p["params"][n]) for n, dist in space.items()] for p in rows])
    y = np.array([p["value"] if p["value"] is not None else worst for p in rows])
    return x, y


def space_of(table):
    """The Optuna distributions the table was built on."""
    from optuna.distributions import json_to_distribution

    return {name: json_to_distribution(text) for name, text in table["space"].items()}


def surrogate_quality(table) -> str:
    """5-fold cross-validated RMSE and Spearman correlation of each surrogate kind on the table."""
    import numpy as np
    from scipy.stats import spearmanr
    from sklearn.model_selection import KFold, cross_val_predict

    x, y = table_xy(table, space_of(table))
    if len(y) < 10:
        return f"{table['task']}: {len(y)} design points, too few to cross-validate a surrogate"
    out = [f"{table['task']}: {len(y)} design points, sd {y.std():.3f}, 5-fold CV of the surrogate:"]
    for kind in ("forest", "gp", "knn"):
        predicted = cross_val_predict(surrogate_model(kind), x, y, cv=KFold(5, shuffle=True, random_state=0))
        out.append(f"  {kind:6s} RMSE {np.sqrt(np.mean((predicted - y) ** 2)):.4f}  "
                   f"Spearman {spearmanr(predicted, y).statistic:.3f}")
    return "\n".join(out)


class Surrogate:
    """The objective a replay sees: the model's mean at a configuration, plus the seeded noise, rounded to
    the task's accuracy grid.

    The noise is measured at the best configurations (the retrained ones) but is not the same everywhere: a
    configuration that learns nothing scores the majority class whatever its seed. So its standard
    deviation scales with the gain above the plateau: noise_sd * (mean - plateau) / (replicates' mean -
    plateau), kept within [0.1, 1] times noise_sd; the plateau is the table's lower quartile. (Uniform
    noise of the best configurations' size would let configurations that learn nothing draw scores as high as
    the best ones, and turn every arm into a random search. Above 1: the replicates do not show noise
    growing past them, and a larger draw makes up scores far above any measured.)"""

    def __init__(self, table, kind: str = "forest"):
        import numpy as np

        self.space = space_of(table)
        x, y = table_xy(table, self.space)
        self.model = surrogate_model(kind).fit(x, y)
        self.noise_sd = replicate_noise(table) or 0.0
        self.plateau = float(np.percentile(y, 25))
        groups = replicate_groups(table)
        self.replicated_mean = statistics.mean(statistics.mean(v) for v in groups.values()) if groups else None
        self.grid = table["task_settings"]["eval_rows"]
        self.table_best = float(y.max())
        self._mean_cache: dict[str, float] = {}

    def sd(self, mean: float) -> float:
        if self.replicated_mean is None or self.replicated_mean <= self.plateau:
            return self.noise_sd
        return self.noise_sd * min(1.0, max(0.1, (mean - self.plateau) / (self.replicated_mean - self.plateau)))

    def mean(self, params: dict) -> float:
        key = json.dumps(params, sort_keys=True)
        if key not in self._mean_cache:
            import numpy as np
            x = np.array([[to_unit(dist, params[n]) for n, dist in self.space.items()]])
            self._mean_cache[key] = float(self.model.predict(x)[0])
        return self._mean_cache[key]

    def observe(self, params: dict, seed: int) -> float:
        import numpy as np

        key = json.dumps(params, sort_keys=True)
        digest = int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:8], "little")
        mean = self.mean(params)
        value = min(1.0, max(0.0, mean + self.sd(mean) * np.random.default_rng(digest).standard_normal()))
        return round(value * self.grid) / self.grid


# --- replay ---------------------------------------------------------------------------------------------
def make_arm(arm: str, seed: int, spec, tools):
    """(sampler, refiner or None) of an arm, as a search builds them."""
    import optuna

    if arm in ("random", "tpe", "gp"):   # gp: the product's, GPSampler with 4 startup trials (search/run/gp.py)
        return tools["make_sampler"](arm, seed), None
    if arm == "tpe+refine":   # as the searcher: the product's TPE inside a RefinedSampler, and the Refiner
        return tools["RefinedSampler"](tools["make_sampler"]("tpe", seed), seed), tools["Refiner"].from_spec(spec)
    if arm == "gp-optuna":
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False), None
    if arm == "tpe-optuna":
        return optuna.samplers.TPESampler(seed=seed), None
    raise ValueError(arm)


def run_arm(spec, surrogate: Surrogate, arm: str, seed: int, budget: int, tools):
    """The observed value and the surrogate's mean of each trial, in order (the loop of
    benchmarks/refinement.py: ask with the spec's distributions, defaults first, tell, maybe refine)."""
    import optuna

    sampler, refiner = make_arm(arm, seed, spec, tools)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    if refiner is not None:
        refiner.attach(study)
    study.enqueue_trial(spec.default_params(complete=True))
    space, observed, means = spec.search_space(), [], []
    for _ in range(budget):
        trial = study.ask(fixed_distributions=space)
        for name, value in spec.decode(trial.params).items():   # what the refiner's trial rows read
            trial.set_user_attr(f"param_{name}", value)
        if refiner is not None:
            refiner.mark(trial)
        value = surrogate.observe(trial.params, seed)
        study.tell(trial, value)
        observed.append(value)
        means.append(surrogate.mean(trial.params))
        if refiner is not None:
            refiner.maybe_refine(study)
    return observed, means


def first_reach(values, target) -> int | None:
    for count, value in enumerate(values, start=1):
        if value >= target:
            return count
    return None


_REPLAY = {}   # per worker process: task -> (spec, surrogate), and the product's tools


def _replay_one(job):
    task, seed, arm = job
    spec, surrogate = _REPLAY[task]
    started = time.time()
    observed, means = run_arm(spec, surrogate, arm, seed, 2 * max(NS), _REPLAY["tools"])
    return {"task": task, "seed": seed, "arm": arm, "observed": observed, "means": means,
            "seconds": round(time.time() - started, 2)}


def _init_worker():
    import optuna
    import torch

    torch.set_num_threads(1)   # one core per job; GPSampler's fits are small
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("peft_search").setLevel(logging.WARNING)


def replay(args):
    import warnings

    warnings.filterwarnings("ignore", category=Warning, module="optuna")
    workdir = tempfile.mkdtemp(prefix="sampler_choice_replay_")
    arms = list(CANDIDATES) + list(args.reference)
    _REPLAY["tools"] = product()
    tables = {}
    for task in args.tasks:
        tables[task] = read_json(table_path(task))
        _REPLAY[task] = (load_task(task, workdir), Surrogate(tables[task], args.surrogate))
        print(surrogate_quality(tables[task]))
        model = _REPLAY[task][1]
        print(f"  replay surrogate: {args.surrogate}; observation noise sd {model.noise_sd} at the replicates' "
              f"mean {model.replicated_mean:.3f}, {model.sd(model.plateau):.4f} at the plateau "
              f"{model.plateau:.3f}; best design value {model.table_best:.4f}", flush=True)
    jobs = [(task, seed, arm) for task in args.tasks for seed in range(args.seeds) for arm in arms]
    started = time.time()
    runs = []
    if args.jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(args.jobs, initializer=_init_worker) as pool:
            for run in pool.imap_unordered(_replay_one, jobs):
                runs.append(run)
                print(f"{run['task']} seed {run['seed']} {run['arm']}: best {max(run['observed']):.4f} "
                      f"({run['seconds']} s)", flush=True)
    else:
        _init_worker()
        for job in jobs:
            runs.append(_replay_one(job))
            run = runs[-1]
            print(f"{run['task']} seed {run['seed']} {run['arm']}: best {max(run['observed']):.4f} "
                  f"({run['seconds']} s)", flush=True)
    summary = summarise(runs, args, arms)
    summary["wall_s"] = round(time.time() - started, 1)
    summary["tables"] = {t: {"trainings": len(tab["points"]), "noise_sd": tab.get("noise_sd"),
                             "train_s_mean": tab.get("train_s_mean")} for t, tab in tables.items()}
    summary["product_default"] = product_default()
    report(summary)
    suffix = "" if args.surrogate == "forest" else f"_{args.surrogate}"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"sampler_choice{suffix}.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    plot(summary, os.path.join(RESULTS, f"sampler_choice{suffix}.svg"))


def product_default() -> dict:
    section = product()["SearchSection"]()
    return {"algorithm": section.algorithm, "refine_every": section.refine_every,
            "arm": section.algorithm + ("+refine" if section.refine_every else "")}


def summarise(runs, args, arms) -> dict:
    """Per N and arm: medians over seeds and tasks, ranks, the decision."""
    import numpy as np
    from scipy.stats import rankdata, wilcoxon

    by = {(r["task"], r["seed"], r["arm"]): r for r in runs}
    cells = sorted({(r["task"], r["seed"]) for r in runs})
    per_n, ranks, paired = {}, {a: [] for a in CANDIDATES}, {a: {} for a in CANDIDATES}
    for n in NS:
        rows = {}
        for arm in arms:
            best, true, need, per_task = [], [], [], {}
            for task, seed in cells:
                run, tpe = by[(task, seed, arm)], by[(task, seed, "tpe")]
                target = max(tpe["observed"][:n])
                value = max(run["observed"][:n])
                incumbent = run["observed"][:n].index(value)   # the best trial the search would report
                reach = first_reach(run["observed"][:2 * n], target)
                best.append(value)
                true.append(run["means"][incumbent])
                need.append(reach / n if reach else math.inf)
                per_task.setdefault(task, []).append(value)
            med_need = statistics.median(need)
            rows[arm] = {
                "median_best": round(statistics.median(best), 4),
                "mean_best": round(statistics.mean(best), 4),
                # the surrogate's mean at the reported best configuration: its quality without the lucky draw
                "median_true_of_best": round(statistics.median(true), 4),
                "median_trials_to_tpe_best_over_n": round(med_need, 3) if math.isfinite(med_need) else None,
                "share_reaching_tpe_best": round(sum(math.isfinite(x) for x in need) / len(need), 3),
                "median_best_by_task": {t: round(statistics.median(v), 4) for t, v in per_task.items()},
            }
        per_n[str(n)] = rows
        for task, seed in cells:   # ranks among the candidates (1 = best), per cell
            values = [max(by[(task, seed, a)]["observed"][:n]) for a in CANDIDATES]
            for arm, rank in zip(CANDIDATES, rankdata([-v for v in values])):
                ranks[arm].append(float(rank))
            for arm in CANDIDATES:   # summed over N: N = 10 and 20 come from the same runs, one pair per run
                paired[arm][(task, seed)] = paired[arm].get((task, seed), 0.0) + (
                    max(by[(task, seed, arm)]["observed"][:n]) - max(by[(task, seed, "tpe")]["observed"][:n]))
    mean_rank = {a: round(statistics.mean(r), 3) for a, r in ranks.items()}
    versus_tpe = {}
    for arm in CANDIDATES:
        if arm == "tpe":
            continue
        d = np.array(list(paired[arm].values()))
        p = float(wilcoxon(d, alternative="greater").pvalue) if np.any(d != 0) else 1.0
        versus_tpe[arm] = {"wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((d < 0).sum()),
                           "mean_difference": round(float(d.mean()), 4), "wilcoxon_p_greater": round(p, 4)}
    leader = min(CANDIDATES, key=lambda a: (mean_rank[a], a != "tpe"))
    switch = leader != "tpe" and versus_tpe[leader]["wilcoxon_p_greater"] < 0.05
    default = leader if switch else "tpe"
    headline = {}
    for n in NS:
        headline[str(n)] = {
            "default_trials_to_tpe_best_over_n": per_n[str(n)][default]["median_trials_to_tpe_best_over_n"],
            "default_median_best": per_n[str(n)][default]["median_best"],
            "tpe_median_best": per_n[str(n)]["tpe"]["median_best"],
        }
    return {
        "tasks": sorted({t for t, _ in cells}), "seeds": args.seeds, "ns": list(NS), "surrogate": args.surrogate,
        "arms": arms, "candidates": list(CANDIDATES),
        "rule": "lowest mean rank of best-at-N among the candidates over all (task, seed, N) cells; it replaces "
                "tpe only if a one-sided paired Wilcoxon signed-rank test of its best-at-N against tpe's (per "
                "task and seed, summed over the two N) gives p < 0.05",
        "per_n": per_n, "mean_rank": mean_rank, "versus_tpe": versus_tpe, "leader": leader, "default": default,
        "headline": headline,
        "curves": curves(runs, arms),
        "runs": [{k: r[k] for k in ("task", "seed", "arm", "observed", "seconds")} for r in runs],
    }


def curves(runs, arms) -> dict:
    """task -> arm -> median over seeds of the best value after each trial."""
    out: dict[str, dict[str, list]] = {}
    for task in sorted({r["task"] for r in runs}):
        out[task] = {}
        for arm in arms:
            series = [r["observed"] for r in runs if r["task"] == task and r["arm"] == arm]
            running = [[max(s[:i + 1]) for i in range(len(s))] for s in series]
            out[task][arm] = [round(statistics.median(col), 4) for col in zip(*running)]
    return out


def report(summary):
    print(f"\nsurrogate {summary['surrogate']}; {len(summary['tasks'])} tasks x {summary['seeds']} seeds; "
          "medians over seeds and tasks")
    for n in NS:
        print(f"N = {n}: arm, median best at N, median surrogate mean of that best, median trials to TPE's best / N, "
              "share reaching it within 2N")
        for arm, row in summary["per_n"][str(n)].items():
            ratio = row["median_trials_to_tpe_best_over_n"]
            print(f"  {arm:11s} {row['median_best']:.4f}  {row['median_true_of_best']:.4f}  "
                  f"{'not reached' if ratio is None else f'{ratio:.2f}':>11s}  {row['share_reaching_tpe_best']:.2f}  "
                  + "  ".join(f"{t} {v:.4f}" for t, v in row["median_best_by_task"].items()))
    print("mean rank among the candidates (1 = best):", summary["mean_rank"])
    print("against tpe, cell by cell:", json.dumps(summary["versus_tpe"]))
    print(f"rule: {summary['rule']}")
    print(f"leader {summary['leader']}; the default should be: {summary['default']} "
          f"(now: {summary['product_default']['arm']})")
    for n, h in summary["headline"].items():
        ratio = h["default_trials_to_tpe_best_over_n"]
        print(f"N = {n}: the default ({summary['default']}) needs "
              f"{'more than 2N' if ratio is None else f'{ratio:.2f} N'} trials to reach TPE's best at N "
              f"(target <= 0.5); its best at N {h['default_median_best']:.4f} against TPE's {h['tpe_median_best']:.4f}")


# --- the plot (plain SVG: matplotlib is not a dependency of this project) ---------------------------------
COLOURS = {"random": "#7f7f7f", "tpe": "#1f77b4", "gp": "#d62728", "tpe+refine": "#2ca02c",
           "tpe-optuna": "#9ecae1", "gp-optuna": "#f4a582"}


def plot(summary, path: str):
    from html import escape

    tasks = summary["tasks"]
    width, height, left, top, panel_w, panel_h = 420 * len(tasks) + 140, 330, 60, 40, 340, 240
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
              f'font-family="sans-serif" font-size="11">'),
             (f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">Median best eval accuracy so far '
              f'over {summary["seeds"]} seeds (surrogate: {escape(summary["surrogate"])}); dotted: N = 10, 20</text>')]
    for i, task in enumerate(tasks):
        series = summary["curves"][task]
        x0 = left + i * 420
        lo = min(min(v) for v in series.values())
        hi = max(max(v) for v in series.values())
        lo, hi = math.floor(lo * 50) / 50, math.ceil(hi * 50) / 50
        trials = len(next(iter(series.values())))

        def px(t, x0=x0, trials=trials):
            return x0 + (t - 1) / (trials - 1) * panel_w

        def py(v, lo=lo, hi=hi):
            return top + panel_h - (v - lo) / max(1e-9, hi - lo) * panel_h
        parts.append(f'<rect x="{x0}" y="{top}" width="{panel_w}" height="{panel_h}" fill="none" stroke="#333"/>')
        parts.append(f'<text x="{x0 + panel_w / 2}" y="{top - 6}" text-anchor="middle">{escape(task)}</text>')
        for k in range(6):
            v = lo + k * (hi - lo) / 5
            parts.append(f'<text x="{x0 - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
            parts.append(f'<line x1="{x0}" x2="{x0 + panel_w}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>')
        for t in (1, 10, 20, 30, 40):
            if t <= trials:
                parts.append(f'<text x="{px(t):.1f}" y="{top + panel_h + 14}" text-anchor="middle">{t}</text>')
        for n in NS:
            parts.append(f'<line x1="{px(n):.1f}" x2="{px(n):.1f}" y1="{top}" y2="{top + panel_h}" '
                         f'stroke="#999" stroke-dasharray="3,3"/>')
        parts.append(f'<text x="{x0 + panel_w / 2}" y="{top + panel_h + 30}" text-anchor="middle">trials</text>')
        for arm, values in series.items():
            dash = ' stroke-dasharray="5,3"' if arm in REFERENCE_ARMS else ""
            points = " ".join(f"{px(t + 1):.1f},{py(v):.1f}" for t, v in enumerate(values))
            parts.append(f'<polyline points="{points}" fill="none" stroke="{COLOURS.get(arm, "#000")}" '
                         f'stroke-width="1.8"{dash}/>')
    legend_x = left + len(tasks) * 420 - 50
    for j, arm in enumerate(summary["arms"]):
        y = top + 14 + j * 18
        dash = ' stroke-dasharray="5,3"' if arm in REFERENCE_ARMS else ""
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 22}" y1="{y - 4}" y2="{y - 4}" '
                     f'stroke="{COLOURS.get(arm, "#000")}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{legend_x + 28}" y="{y}">{escape(arm)}</text>')
    parts.append("</svg>")
    with open(path, "w") as handle:
        handle.write("\n".join(parts) + "\n")


# --- check: live searches through the CLI -----------------------------------------------------------------
def check(args):
    """`peft-search run` on the task's cut data, per seed, with the default's algorithm and with TPE."""
    import yaml

    summary_path = os.path.join(RESULTS, "sampler_choice.json")
    summary = read_json(summary_path) if os.path.exists(summary_path) else {}
    arms = args.arms or [summary.get("default", "tpe"), "tpe"]
    if arms[0] == arms[1]:   # the table kept TPE: check its direction against the runner-up
        ranked = sorted(summary.get("mean_rank", {"random": 0}), key=lambda a: summary["mean_rank"][a])
        arms = ["tpe", next(a for a in ranked if a != "tpe")]
    workdir = tempfile.mkdtemp(prefix="sampler_choice_check_")
    load_task(args.task, workdir)   # writes the cut data files
    with open(SPEC) as handle:
        base = yaml.safe_load(handle)
    cli = os.path.join(os.path.dirname(sys.executable), "peft-search")
    live = []
    for seed in args.seeds:
        for arm in arms:
            algorithm = arm.split("+")[0]
            spec = json.loads(json.dumps(base))
            spec["name"] = f"sampler-choice-{args.task}-{arm.replace('+', '-')}-{seed}"
            spec["data"].update(train=os.path.join(workdir, f"{args.task}_train.jsonl"),
                                eval=os.path.join(workdir, f"{args.task}_eval.jsonl"),
                                max_length=TASKS[args.task].max_length)
            spec["search"].update(algorithm=algorithm, trials=args.trials, seed=seed,
                                  refine_every=5 if arm.endswith("+refine") else 0)
            path = os.path.join(workdir, spec["name"] + ".yaml")
            with open(path, "w") as handle:
                yaml.safe_dump(spec, handle)
            started = time.time()
            proc = subprocess.run([cli, "run", path, "--runs-dir", os.path.join(workdir, "runs")],
                                  capture_output=True, text=True, check=False)
            values = trial_values(os.path.join(workdir, "runs", spec["name"], "trials.csv"))
            live.append({"seed": seed, "arm": arm, "exit": proc.returncode, "values": values,
                         "best": max(values) if values else None, "wall_s": round(time.time() - started, 1)})
            if proc.returncode != 0:
                live[-1]["stderr_tail"] = proc.stderr[-2000:]
            print({k: v for k, v in live[-1].items() if k != "stderr_tail"}, flush=True)
    out = compare({"task": args.task, "trials": args.trials, "seeds": args.seeds, "arms": arms, "live": live})
    print(json.dumps({k: v for k, v in out.items() if k != "live"}))
    with open(os.path.join(RESULTS, f"sampler_choice_check_{'_'.join(arms).replace('+', '-')}.json"), "w") as handle:
        json.dump(out, handle, indent=1)


def compare(out: dict) -> dict:
    """The live searches' best at N next to the replay's (sampler_choice.json, read now: it may have been
    written while the live searches ran), per arm, for the checked task and seeds."""
    path = os.path.join(RESULTS, "sampler_choice.json")
    bests = {a: [r["best"] for r in out["live"] if r["arm"] == a and r.get("best") is not None] for a in out["arms"]}
    out["live_mean_best"] = {a: round(statistics.mean(v), 4) if v else None for a, v in bests.items()}
    if os.path.exists(path):
        summary, n = read_json(path), out["trials"]
        if str(n) in summary.get("per_n", {}):
            out["table_median_best"] = {a: summary["per_n"][str(n)][a]["median_best_by_task"].get(out["task"])
                                        for a in out["arms"] if a in summary["per_n"][str(n)]}
        same = [r for r in summary.get("runs", []) if r["task"] == out["task"] and r["seed"] in out["seeds"]]
        out["table_mean_best_same_seeds"] = {
            arm: round(statistics.mean(max(r["observed"][:n]) for r in same if r["arm"] == arm), 4)
            for arm in out["arms"] if any(r["arm"] == arm for r in same)}
    return out


def trial_values(path: str) -> list[float]:
    """The objective of each complete trial in a run's trials.csv, in trial order."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = sorted((r for r in rows if r.get("state") == "COMPLETE" and r.get("eval_accuracy")),
                  key=lambda r: int(r["number"]))
    return [float(r["eval_accuracy"]) for r in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build", help="train the tables")
    b.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    b.add_argument("--points", type=int, default=96, help="Sobol points per task (after the defaults)")
    b.add_argument("--replicates", type=int, default=3, help="best configurations retrained with 2 more seeds")
    b.add_argument("--replicate-after", type=int, default=24, help="design points before the replicates")
    b.add_argument("--design-seed", type=int, default=0)
    b.add_argument("--minutes", type=float, default=40, help="wall-time budget; build resumes where it stopped")
    r = sub.add_parser("replay", help="replay the samplers against the tables")
    r.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    r.add_argument("--seeds", type=int, default=20, help="seeds 0 .. SEEDS-1 per task")
    r.add_argument("--surrogate", default="forest", choices=("forest", "gp", "knn"))
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--reference", nargs="*", default=["tpe-optuna"], choices=list(REFERENCE_ARMS),
                   help="arms shown for reference (gp-optuna costs as much as gp)")
    c = sub.add_parser("check", help="live searches through the CLI")
    c.add_argument("--task", default="manpages", choices=list(TASKS))
    c.add_argument("--trials", type=int, default=10)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    c.add_argument("--arms", nargs=2, help="default: the replay's default and tpe")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    {"build": build, "replay": replay, "check": check}[args.step](args)


if __name__ == "__main__":
    main()
