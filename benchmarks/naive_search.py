"""Hand-written naive baseline for the trial-overhead benchmark.

Does the same work as /work/shared/anchors/naive_tune.py: a Ray Tune search (OptunaSearch +
ASHA, one trial at a time) where every trial launches its own Ray Train TorchTrainer worker
group, which loads a tiny LLaMA from disk, wraps it with a LoRA adapter (q/v, r from the
search space) and trains it for `steps` steps on random tokens (batch 8 x 64), reporting
the loss after every step.

On top of the anchor's figures it writes per-trial timestamps (trial function start/end,
worker loop start, model ready, first/last step) to `workdir/timing/` and returns a
breakdown of where the overhead goes.

    python benchmarks/naive_search.py [--trials 6] [--steps 20] [--workdir DIR]
"""
import argparse
import glob
import json
import os
import tempfile
import time

import torch

VOCAB, BATCH, SEQ = 512, 8, 64


def build_tiny_llama(path):
    """2-layer, 128-wide LLaMA with random weights (same shapes and seed as the anchor)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)


def _stamp(timing_dir, key, **fields):
    with open(os.path.join(timing_dir, f"{key}.json"), "w") as f:
        json.dump(fields, f)


def worker_loop(cfg):
    """Ray Train worker: load base model, add LoRA, train cfg['steps'] steps, report each step."""
    t_loop = time.time()
    import ray.train
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg["model"])
    lora = LoraConfig(r=cfg["r"], lora_alpha=2 * cfg["r"], target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    gen = torch.Generator().manual_seed(0)
    t_ready = time.time()
    train_s, t_first = 0.0, None
    for step in range(cfg["steps"]):
        t = time.perf_counter()
        x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        train_s += time.perf_counter() - t
        if t_first is None:
            t_first = time.time()
        # Stamp before reporting: ASHA may stop the trial at this report.
        _stamp(cfg["timing"], f"{cfg['key']}.worker", loop=t_loop, ready=t_ready, first=t_first,
               last=time.time(), steps=step + 1, train_s=train_s)
        ray.train.report({"loss": loss.item(), "train_s": train_s})


def make_trial(timing_dir, storage):
    def trial(cfg):
        from ray import tune
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        key = tune.get_context().get_trial_id()
        t0 = time.time()
        _stamp(timing_dir, f"{key}.trial", start=t0)
        try:
            TorchTrainer(worker_loop, train_loop_config={**cfg, "key": key, "timing": timing_dir},
                         scaling_config=ScalingConfig(num_workers=1),
                         run_config=RunConfig(name=f"train_{key}", storage_path=storage,
                                              callbacks=[TuneReportCallback()])).fit()
        finally:
            _stamp(timing_dir, f"{key}.trial", start=t0, end=time.time())
    return trial


def _breakdown(timing_dir, t_start, t_end):
    trials = []
    for p in sorted(glob.glob(os.path.join(timing_dir, "*.trial.json"))):
        tr = json.load(open(p))
        wp = p.replace(".trial.json", ".worker.json")
        if os.path.exists(wp):
            tr.update(json.load(open(wp)))
        trials.append(tr)
    trials.sort(key=lambda t: t["start"])

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return round(sum(xs) / len(xs), 2) if xs else None

    ends = [t.get("end") for t in trials]
    gaps = [b["start"] - a for a, b in zip(ends, trials[1:]) if a is not None]
    return {
        "per_trial_mean_s": {
            "worker_group_start": mean([t["loop"] - t["start"] for t in trials if "loop" in t]),
            "model_load_and_lora": mean([t["ready"] - t["loop"] for t in trials if "ready" in t]),
            "first_step_to_last_step": mean([t["last"] - t["first"] for t in trials if "last" in t]),
            "train_s": mean([t.get("train_s") for t in trials]),
            # ray.train.report -> TuneReportCallback -> Tune, per step (dominates first->last step)
            "per_report": mean([(t["last"] - t["first"]) / (t["steps"] - 1) for t in trials if t.get("steps", 0) > 1]),
            "steps": mean([t.get("steps") for t in trials]),
            "after_last_step_to_trial_end": mean([t["end"] - t["last"] for t in trials if "last" in t and "end" in t]),
            "trial_total": mean([t["end"] - t["start"] for t in trials if "end" in t]),
            "gap_between_trials": mean(gaps),
        },
        "before_first_trial_s": round(trials[0]["start"] - t_start, 2) if trials else None,
        "after_last_trial_s": round(t_end - ends[-1], 2) if trials and ends[-1] else None,
        "trials_started": len(trials),
    }


def run_naive(trials: int, steps: int, workdir: str) -> dict:
    """Run the naive search; return wall_s, train_s, steps_total, overhead_per_trial_s, train_fraction (+ breakdown)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    workdir = os.path.abspath(workdir)
    model = os.path.join(workdir, "tiny_llama")
    storage = os.path.join(workdir, "ray_results")
    timing = os.path.join(workdir, "timing")
    os.makedirs(timing, exist_ok=True)
    if not os.path.exists(os.path.join(model, "config.json")):
        build_tiny_llama(model)
    # More logical CPUs than cores, as in the anchor: the finished trial's worker group
    # still holds its CPU while the next trial's group asks for one.
    ray.init(num_cpus=8, include_dashboard=False)
    try:
        t0 = time.time()
        tuner = tune.Tuner(
            tune.with_resources(make_trial(timing, storage), {"cpu": 0.01}),
            param_space={"r": tune.choice([1, 4, 16]), "lr": tune.loguniform(1e-4, 1e-2),
                         "steps": steps, "model": model},
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(metric="loss", mode="min"),
                scheduler=ASHAScheduler(metric="loss", mode="min", max_t=steps, grace_period=max(1, steps // 4)),
                num_samples=trials, max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=storage, name="naive_search", verbose=0),
        )
        grid = tuner.fit()
        wall = time.time() - t0
    finally:
        ray.shutdown()
    df = grid.get_dataframe()
    train_s = float(df["train_s"].sum())
    out = {"baseline": "naive_search", "trials": trials, "steps": steps,
           "steps_total": int(df["training_iteration"].sum()), "wall_s": round(wall, 1), "train_s": round(train_s, 1),
           "overhead_per_trial_s": round((wall - train_s) / trials, 2), "train_fraction": round(train_s / wall, 3),
           "errors": int(sum(1 for r in grid if r.error))}
    out["breakdown"] = _breakdown(timing, t0, t0 + wall)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    print(json.dumps(run_naive(a.trials, a.steps, a.workdir or tempfile.mkdtemp(prefix="naive_search_"))))


if __name__ == "__main__":
    main()
