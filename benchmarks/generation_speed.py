"""Generation-based evaluation's cost: generation time vs training time per round, and batched generation vs one
row at a time, at an example spec's defaults, in the same process.

One trial of the spec (default: examples/instruction_smollm2.yaml, SmolLM2-135M-Instruct on CPU) is set up as
the recipe sets it up (trainers/recipe.setup, its first sampled configuration = the published defaults); then
1. one eval round's training: the optimizer steps up to the first round's end (trainers/recipe.train);
2. that round's generation: the spec's `generation.rows` eval questions answered in batches of
   `generation.batch_size` (trainers/generation.generation_round, as each round runs it);
3. the same questions answered one row at a time (batch size 1: what a loop of `model.generate` per row does,
   the baseline), after a warm-up answer so that neither side pays first-call costs.
The answers of 2 and 3 must be the same (greedy; left padding must not change them).

    python benchmarks/generation_speed.py [--spec examples/instruction_smollm2.yaml] [--threads 2]

Prints the figures and, as its last line, one JSON object; writes benchmarks/results/generation_speed.json.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "generation_speed.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default=os.path.join(ROOT, "examples", "instruction_smollm2.yaml"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the spec's cpus_per_worker on CPU)")
    args = parser.parse_args()

    import torch

    from search.spec import load_spec
    from trainers import recipe
    from trainers.generation import answer, generation_round

    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    settings = spec.trial_settings({})
    settings = replace(settings, engine=replace(settings.engine, num_threads=args.threads))
    trial = recipe.setup(settings)
    try:
        model, tokenizer, questions, generation = trial.peft_model, trial.base.tokenizer, trial.questions, \
            settings.generation
        answer(model.eval(), tokenizer, questions[:1], replace(generation, max_new_tokens=2), trial.ctx.device)
        model.train()
        started = time.perf_counter()
        recipe.train(trial, trial.plan.round_ends[0])
        train_s = time.perf_counter() - started
        steps = trial.plan.round_ends[0]
        round_figures = generation_round(model, tokenizer, questions, generation, trial.ctx)
        batched_s = round_figures["generate_s"]
        model.eval()
        started = time.perf_counter()
        single = answer(model, tokenizer, questions, replace(generation, batch_size=1), trial.ctx.device)
        single_s = time.perf_counter() - started
        batched = answer(model, tokenizer, questions, generation, trial.ctx.device)
    finally:
        recipe.cleanup(trial)
    same = sum(a == b for a, b in zip(batched, single))
    result = {
        "spec": os.path.relpath(args.spec, ROOT), "model": spec.model.name_or_path, "threads": args.threads,
        "device": str(trial.ctx.device), "round_steps": steps, "batch_size": settings.training.batch_size,
        "generation": {"rows": len(questions), "max_new_tokens": generation.max_new_tokens,
                       "batch_size": generation.batch_size},
        "train_round_s": round(train_s, 2), "generate_round_s": round(batched_s, 2),
        "generate_share_of_round": round(batched_s / (train_s + batched_s), 3),
        "one_row_at_a_time_s": round(single_s, 2), "batched_speedup": round(single_s / batched_s, 2),
        "answers_equal_batched_vs_single": f"{same} of {len(questions)}",
        "scores": {key: round(value, 4) for key, value in round_figures.items() if key.startswith("eval_")},
    }
    print(f"one round at the defaults of {result['spec']} ({args.threads} threads, {result['device']}):")
    print(f"  training  {steps} steps: {train_s:.1f} s")
    print(f"  generating {len(questions)} answers (batches of {generation.batch_size}): {batched_s:.1f} s "
          f"= {result['generate_share_of_round']:.0%} of the round")
    print(f"  the same answers one row at a time: {single_s:.1f} s; batched is {result['batched_speedup']:.1f}x "
          f"faster; answers equal: {result['answers_equal_batched_vs_single']}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
