"""Trial overhead: the hand-written Ray Tune search vs peft-search, same workload, same run.

Workload (that of shared/anchors/naive_tune.py): a tiny LLaMA (2 layers, 128 wide) loaded from disk,
LoRA on q/v with r in {1, 4, 16} and a log-uniform learning rate, 20 training steps of batch 8 x 64
tokens per trial, OptunaSearch + ASHA, one trial at a time, each trial its own Ray Train worker group.
peft-search runs it through `run_search` exactly as `peft-search run` would (DeepSpeed ZeRO-2, eval
rounds, checkpoints, run directory, report) on its persistent worker group (search/run/pool.py), its Ray
start-up counted in its wall time (the naive one's is not). Trials per hour = trials / wall time.

    python benchmarks/trial_overhead.py [--trials 32] [--naive-trials 6] [--steps 20]

Prints both sides and, as its last line, one JSON object; writes benchmarks/results/trial_overhead.json.
"""
import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.naive_search import BATCH, SEQ, build_tiny_llama, run_naive  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trial_overhead.json")


def prepare_ours(workdir: str, trials: int, steps: int, pack: int = 1) -> str:
    """The same tiny LLaMA (plus a tokenizer, which a real spec needs) and rows of SEQ tokens."""
    from trainers.tiny_models import VOCAB, build_tiny_tokenizer

    model = os.path.join(workdir, "tiny_llama_tok")
    build_tiny_llama(model)
    build_tiny_tokenizer(causal=True).save_pretrained(model)
    words = [w for w in VOCAB if w.isalpha()]
    rng = random.Random(0)
    for name, rows in (("train", steps * BATCH), ("eval", BATCH)):
        with open(os.path.join(workdir, f"{name}.jsonl"), "w") as handle:
            for _ in range(rows):  # SEQ - 1 words + </s> = SEQ tokens, as the naive batches
                handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(SEQ - 1))}) + "\n")
    spec = {
        "name": "overhead",
        "model": {"name_or_path": model, "task": "causal-lm"},
        "data": {"train": os.path.join(workdir, "train.jsonl"), "eval": os.path.join(workdir, "eval.jsonl"),
                 "text_field": "text", "max_length": SEQ},
        "peft": {"method": "lora", "target_modules": ["q_proj", "v_proj"]},
        "space": {"r": [1, 4, 16], "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}},
        "training": {"epochs": 1, "batch_size": BATCH, "max_steps": steps},
        "objective": {"metric": "eval_loss", "mode": "min"},
        "search": {"algorithm": "tpe", "trials": trials, "concurrency": 1, "scheduler": "asha", "pack": pack,
                   "evals_per_epoch": 4, "grace_rounds": 1, "seed": 0},
        "tracking": {"wandb": "disabled"},
    }
    import yaml
    path = os.path.join(workdir, "overhead.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(spec, handle)
    return path


def run_ours(trials: int, steps: int, workdir: str, pack: int = 1) -> dict:
    from search.run.driver import run_search
    from search.spec.search_spec import load_spec

    spec = load_spec(prepare_ours(workdir, trials, steps, pack))
    t0 = time.time()
    run_dir = run_search(spec, os.path.join(workdir, "runs"))
    wall = time.time() - t0
    with open(os.path.join(run_dir, "trials.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    train_s = sum(float(r["train_s"] or 0) for r in rows)
    trials_by_start = _trials_by_start(run_dir)
    # start-up: Ray's start until the first trial got its parameters; paid once per search, so the figure after
    # it is what each further trial costs
    startup = trials_by_start[0].datetime_start.timestamp() - t0
    result = {"side": "peft-search", "trials": len(rows), "states": {s: sum(r["state"] == s for r in rows)
                                                                    for s in ("COMPLETE", "PRUNED", "FAIL")},
              "wall_s": round(wall, 1), "train_s": round(train_s, 1), "startup_s": round(startup, 1),
              "overhead_per_trial_s": round((wall - train_s) / trials, 2),
              "overhead_per_trial_after_startup_s": round((wall - startup - train_s) / trials, 2),
              "train_fraction": round(train_s / wall, 3)}
    if pack == 1:   # one trial at a time: each trial's own time apart from its training steps
        train_by_number = {int(r["number"]): float(r["train_s"] or 0) for r in rows}
        outside = [(t.datetime_complete - t.datetime_start).total_seconds() - train_by_number[t.number]
                   for t in trials_by_start]
        # the first trial waits for the first worker group: its processes, imports and the base's load
        result["first_trial_outside_training_s"] = round(outside[0], 1)
        result["later_trials_outside_training_s"] = round(sum(outside[1:]) / max(1, len(outside) - 1), 2)
    return result


def _trials_by_start(run_dir: str) -> list:
    from search.store.results import load_study
    from search.store.storage import open_storage

    study = load_study(open_storage("sqlite", run_dir))
    return sorted((t for t in study.get_trials(deepcopy=False) if t.datetime_start), key=lambda t: t.datetime_start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=32, help="peft-search's trials")
    parser.add_argument("--naive-trials", type=int, default=6,
                        help="the naive search's trials (its rate is steady: each trial starts a worker group)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pack", type=int, default=4, help="also run the search with search.pack: PACK (1: not)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="trial_overhead_")
    naive = run_naive(args.naive_trials, args.steps, os.path.join(workdir, "naive"))
    ours = run_ours(args.trials, args.steps, os.path.join(workdir, "ours"))
    for side in (naive, ours):
        print(f"{side.get('side', 'naive'):>12}: {side['trials']} trials, wall {side['wall_s']:7.1f} s, in training "
              f"steps {side['train_s']:6.1f} s, overhead per trial {side['overhead_per_trial_s']:6.2f} s"
              + (f" ({side['overhead_per_trial_after_startup_s']:.2f} s after a {side['startup_s']:.1f} s start-up)"
                 if "startup_s" in side else ""))
    per_hour = {name: 3600 * side["trials"] / side["wall_s"] for name, side in (("naive", naive), ("ours", ours))}
    summary = {
        "steps": args.steps,
        "naive_trials": naive["trials"], "ours_trials": ours["trials"],
        "naive_wall_s": naive["wall_s"], "ours_wall_s": ours["wall_s"],
        "naive_train_s": naive["train_s"], "ours_train_s": ours["train_s"],
        "naive_overhead_per_trial_s": naive["overhead_per_trial_s"],
        "ours_overhead_per_trial_s": ours["overhead_per_trial_s"],
        "ours_startup_s": ours["startup_s"], "ours_overhead_per_trial_after_startup_s": ours["overhead_per_trial_after_startup_s"],
        "ours_first_trial_outside_training_s": ours["first_trial_outside_training_s"],
        "ours_later_trials_outside_training_s": ours["later_trials_outside_training_s"],
        "naive_trials_per_hour": round(per_hour["naive"], 1), "ours_trials_per_hour": round(per_hour["ours"], 1),
        "trials_per_hour_ratio": round(per_hour["ours"] / per_hour["naive"], 2),
        "naive_breakdown": naive.get("breakdown"), "ours_states": ours["states"],
    }
    if args.pack > 1:   # packed trials report no train_s of their own: trials per hour is the figure
        packed = run_ours(args.trials, args.steps, os.path.join(workdir, "packed"), pack=args.pack)
        print(f"{'packed':>12}: {packed['trials']} trials, wall {packed['wall_s']:7.1f} s (search.pack: {args.pack})")
        per_hour["packed"] = 3600 * packed["trials"] / packed["wall_s"]
        summary.update(pack=args.pack, packed_wall_s=packed["wall_s"], packed_states=packed["states"],
                       packed_trials_per_hour=round(per_hour["packed"], 1),
                       packed_vs_one_at_a_time=round(per_hour["packed"] / per_hour["ours"], 2),
                       packed_vs_naive=round(per_hour["packed"] / per_hour["naive"], 2))
    # issue 7's targets, in the same run as the naive search
    summary["targets"] = {"overhead_per_trial_s <= 1": ours["overhead_per_trial_s"] <= 1.0,
                          "overhead_per_trial_after_startup_s <= 1": ours["overhead_per_trial_after_startup_s"] <= 1.0,
                          "trials_per_hour_ratio >= 20": summary["trials_per_hour_ratio"] >= 20}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(summary, handle, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
