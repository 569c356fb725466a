"""Refinement vs plain TPE: how many trials the refined search needs to reach the best accuracy that
plain TPE reaches in N trials, median over seeds, printed as a ratio to N.

Task (benchmarks/refinement.yaml): LoRA on the pretrained MiniLM classifying stdlib docstrings, cut to
--train-rows train and --eval-rows eval rows and 32 tokens so a trial trains in seconds on CPU. Real
training: trainers.recipe.run_trial on one MiniLM loaded once (trainers.model.load_base), its adapter
replaced per trial. A Ray search costs ~40 s a trial here, so each arm runs the Optuna loop in-process
with what a search uses: the spec's space and published-defaults first trial, `make_sampler`'s TPE,
and for the refined arm the searcher's RefinedSampler and search.refine.refiner.Refiner.

Fair by construction: per seed both arms get the same sampler seed and the same objective (the spec's
training seed is fixed, so a configuration always scores the same; identical configurations, as the
arms share every trial before the first refinement, are trained once). The target is plain TPE's best
after N trials; the refined arm runs until it reaches the target or 2N trials. A seed where it does not
is reported as not reached and counts as never (infinity) in the median.

Two ratios, as the arms coincide until the first refinement (after 10 complete trials): trials the
refined search needs over N (the issue's headline: the budget plain TPE spent on that best), and over
the trial at which plain TPE itself first hit it (1.0: refinement changed nothing; a seed whose best
came before the first refinement necessarily gives 1.0 here).

Power: with 160 eval rows one accuracy step is 0.6 points and a score near 60% has a binomial standard
error of ~4 points, so the target (the best of N noisy scores) is partly a lucky draw; differences of a
few trials on 3 seeds are within chance. More seeds or eval rows sharpen it, at a cost in time.

    python benchmarks/refinement.py [--seeds 0 1 2] [--trials 20] [--train-rows 320] [--eval-rows 160]

Prints one line per arm and seed and, as its last line, one JSON object; writes
benchmarks/results/refinement.json.
"""
import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = os.path.join(HERE, "refinement.yaml")
RESULTS = os.path.join(HERE, "results", "refinement.json")


def load_task(workdir: str, trials: int, train_rows: int, eval_rows: int):
    """The benchmark spec with its data cut to the first rows of each file, and N = `trials`."""
    from search.spec.search_spec import load_spec

    spec = load_spec(SPEC)
    cut = {}
    for name, source, rows in (("train", spec.data.train, train_rows), ("eval", spec.data.eval, eval_rows)):
        cut[name] = os.path.join(workdir, f"{name}.jsonl")
        with open(source, encoding="utf-8") as src, open(cut[name], "w", encoding="utf-8") as dst:
            dst.writelines(line for _, line in zip(range(rows), src))
    return replace(spec, data=replace(spec.data, train=cut["train"], eval=cut["eval"]),
                   search=replace(spec.search, trials=trials))


class Objective:
    """Trains and scores a configuration (Optuna params) on one loaded base; each configuration once."""

    def __init__(self, spec, workdir: str):
        from trainers.data import read_trial_rows
        from trainers.model import load_base
        from trainers.recipe import seed_everything

        self.spec, self.workdir = spec, workdir
        settings = spec.trial_settings({})
        seed_everything(settings.training.seed)   # the new classification head starts the same every run
        labels = read_trial_rows(settings.data, settings.model.task).labels
        self.base = load_base(settings.model, num_labels=len(labels))
        self.cache, self.trained, self.train_s = {}, 0, 0.0

    def __call__(self, params: dict):
        from trainers.errors import TrialFailed
        from trainers.recipe import run_trial

        key = json.dumps(params, sort_keys=True)
        if key not in self.cache:
            started = time.time()
            try:
                final = run_trial(self.spec.trial_settings(params), lambda metrics: None,
                                  os.path.join(self.workdir, "trial"), base=self.base)
                self.cache[key] = final[self.spec.objective.metric]
            except TrialFailed:   # diverged: a FAIL row, as in a search
                self.cache[key] = None
            self.trained += 1
            self.train_s += time.time() - started
        return self.cache[key]


def run_arm(spec, objective: Objective, seed: int, budget: int, refined: bool, target=None):
    """Values of the trials in order (None: failed) and the refinements, stopping at `target`."""
    import optuna
    from optuna.trial import TrialState

    from search.refine.refiner import Refiner
    from search.run.searcher import RefinedSampler, make_sampler

    sampler = make_sampler(spec.search.algorithm, seed)
    refiner = Refiner.from_spec(spec) if refined else None
    study = optuna.create_study(direction="maximize" if spec.objective.mode == "max" else "minimize",
                                sampler=RefinedSampler(sampler, seed) if refined else sampler)
    if refiner is not None:
        refiner.attach(study)
    study.enqueue_trial(spec.default_params(complete=True))   # as the driver: the published defaults first
    space, values = spec.search_space(), []
    for _ in range(budget):
        trial = study.ask(fixed_distributions=space)
        for name, value in spec.decode(trial.params).items():   # what trial_rows reads, as the searcher sets
            trial.set_user_attr(f"param_{name}", value)
        if refiner is not None:
            refiner.mark(trial)
        value = objective(trial.params)
        study.tell(trial, value, state=TrialState.COMPLETE if value is not None else TrialState.FAIL)
        values.append(value)
        if refiner is not None:
            refiner.maybe_refine(study)
        if target is not None and reached(values, target, spec.objective.mode) is not None:
            break
    return values, (refiner.history if refiner is not None else [])


def reached(values, target, mode: str):
    """The number of trials after which the best value first reaches `target` (None: never)."""
    for count, value in enumerate(values, start=1):
        if value is not None and (value >= target if mode == "max" else value <= target):
            return count
    return None


def best(values, mode: str):
    done = [v for v in values if v is not None]
    return (max(done) if mode == "max" else min(done)) if done else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20, help="N: plain TPE's budget")
    parser.add_argument("--train-rows", type=int, default=320)
    parser.add_argument("--eval-rows", type=int, default=160)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("peft_search").setLevel(logging.INFO)   # each refinement, as a search logs it
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    workdir = tempfile.mkdtemp(prefix="refinement_bench_")
    spec = load_task(workdir, args.trials, args.train_rows, args.eval_rows)
    objective = Objective(spec, workdir)
    mode, n = spec.objective.mode, args.trials
    started = time.time()
    per_seed = []
    for seed in args.seeds:
        plain, _ = run_arm(spec, objective, seed, n, refined=False)
        target = best(plain, mode)
        refined, refinements = run_arm(spec, objective, seed, 2 * n, refined=True, target=target)
        row = {"seed": seed, "target": target, "plain_trials_to_target": reached(plain, target, mode),
               "refined_trials_to_target": reached(refined, target, mode), "refined_trials_run": len(refined),
               "refined_best": best(refined, mode),
               "refinements": [{k: e[k] for k in ("after_trials", "fixed", "narrowed")} for e in refinements]}
        per_seed.append(row)
        print(f"seed {seed}: plain TPE best {target:.4f} after {n} trials (first at trial "
              f"{row['plain_trials_to_target']}); refined reaches it "
              + (f"at trial {row['refined_trials_to_target']}" if row["refined_trials_to_target"]
                 else f"NOT within {2 * n} trials (its best {row['refined_best']:.4f})")
              + f"; {len(refinements)} refinement(s)", flush=True)

    def needed(row):
        return row["refined_trials_to_target"] or math.inf

    def finite(value):
        return round(value, 3) if math.isfinite(value) else None   # None: not reached (JSON has no inf)
    median_refined = statistics.median(needed(r) for r in per_seed)
    summary = {
        "n_trials": n, "seeds": args.seeds, "train_rows": args.train_rows, "eval_rows": args.eval_rows,
        "metric": spec.objective.metric,
        "median_refined_trials_to_target": finite(median_refined),
        # the headline: trials the refined search needs for plain TPE's best after N, over N
        "refined_trials_over_n_ratio": finite(median_refined / n),
        "median_plain_trials_to_target": statistics.median(r["plain_trials_to_target"] for r in per_seed),
        # per seed: refined's trials over plain's own first hit of that best; median
        "refined_over_plain_first_hit_ratio": finite(statistics.median(
            needed(r) / r["plain_trials_to_target"] for r in per_seed)),
        "seeds_reached": sum(r["refined_trials_to_target"] is not None for r in per_seed),
        "seeds_best_before_first_refinement": sum(
            not r["refinements"] or r["plain_trials_to_target"] <= r["refinements"][0]["after_trials"]
            for r in per_seed),
        "per_seed": per_seed, "trainings": objective.trained,
        "train_s_per_trial": round(objective.train_s / max(1, objective.trained), 2),
        "wall_s": round(time.time() - started, 1),
    }
    if summary["refined_trials_over_n_ratio"] is None:
        print(f"refined search: plain TPE's best after N={n} NOT reached within {2 * n} trials in the median "
              f"over {len(args.seeds)} seeds: refinement did not pay off here")
    else:
        print(f"refined search needs {median_refined:g} trials (median over {len(args.seeds)} seeds) to reach "
              f"plain TPE's best after N={n}: ratio to N {summary['refined_trials_over_n_ratio']:.3f}; "
              f"plain TPE first hit it at trial {summary['median_plain_trials_to_target']:g} (median), "
              f"refined/plain per seed (median) {summary['refined_over_plain_first_hit_ratio']}; "
              f"{summary['seeds_best_before_first_refinement']} seed(s) found it before any refinement")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(summary, handle, indent=2, default=str)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
