"""Packed trials' throughput: K LoRA trials in one forward/backward (trainers/packing/pack.py) vs one after another.

A random-init LLaMA-shaped model (benchmarks/plain_peft_loop.SHAPES, the 1B shape by default) is saved and
loaded once with trainers.model.load_base; K LoRA trials of mixed ranks (4..64, alpha 2r, no dropout, on
q/k/v/o_proj) each train at batch 1 on rows of exactly `--seq` tokens (no padding), in three arms:
  packed      trainers.packing.pack.Pack: one step = one batch-1 micro-batch of every member in one forward and
              backward, then each member's own AdamW step, schedule, clipping and loss check
  solo        the same K trials one after another through the recipe on the lent base (setup -> train ->
              cleanup, PlainEngine), as a worker runs them without packing
  solo-plain  the same K trials one after another as plain PEFT loops (benchmarks/plain_peft_loop.PlainLoop)
Every arm is timed with benchmarks/gpu_throughput.measure: `--warmup` steps, then `--steps` steps between two
device synchronisations; a sequential arm adds up its K trials' timed seconds, tokens and energy. Aggregate
tokens/s counts every trial's tokens; ratios are packed / solo and packed / solo-plain.

    python benchmarks/packed_throughput.py                         # CUDA: 1B shape, K in {8, 16}
    python benchmarks/packed_throughput.py --device cpu --tiny     # the same code on a tiny LLaMA, in seconds
    python benchmarks/packed_throughput.py --cost-model            # + the cost model's prediction per K

--cost-model probes the base first (trainers/pack_probe.decide: packs of 1 and 2 trials at the largest rank)
and sets its predicted peak memory and tokens/s for each K's mixed ranks beside the packed arm's measured
ones (peak: CUDA's max allocated, or on CPU the process' peak RSS over the arm), and the K it would choose.

Writes JSON to --out (default benchmarks/results/packed_throughput_<device>.json) after every measurement
and prints a markdown table last. No Ray, DeepSpeed or Optuna is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import gpu_throughput as gpu  # noqa: E402
from benchmarks import plain_peft_loop as plain  # noqa: E402

ARMS = ("packed", "solo", "solo-plain")
# Both arms run with the same speed options, so the ratio shows packing alone. Liger is left out by default:
# its fused cross-entropy would serve the solo arm only (a pack computes its members' losses from logits).
GPU_OPTIONS = "autocast=true,gradient_checkpointing=false"


def trial_settings(path: str, data: Dict[str, str], options: Dict[str, Any], index: int, r: int, args):
    from trainers.settings import (DataSettings, EngineSettings, ModelSettings, PeftSettings, TrainingSettings,
                                   TrialSettings)

    return TrialSettings(
        model=ModelSettings(path, task="causal-lm", **options),
        data=DataSettings(train=data["train"], eval=data["eval"], label_field=None, max_length=args.seq),
        peft=PeftSettings("lora", {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
                                   "target_modules": list(plain.LORA_TARGETS)}),
        # learning rates and seeds differ as in a search; max_steps: the timed steps end the trial's only round
        training=TrainingSettings(learning_rate=1e-4 * (1 + index % 3), epochs=1, batch_size=1, warmup_ratio=0.0,
                                  max_steps=args.warmup + args.steps, seed=index),
        engine=EngineSettings(deepspeed=False))


def packed_arm(base, trials: List[Any], args, device, timing: Callable) -> Dict[str, Any]:
    from trainers.packing.pack import Pack
    from trainers.system import reset_window_peak, window_peak_bytes

    pack = Pack(base, device)
    try:
        started = time.perf_counter()
        for index, settings in enumerate(trials):
            pack.add(index, settings)
        add_s = time.perf_counter() - started

        def run_steps(count: int) -> None:
            for _ in range(count):
                failed = pack.step().failed
                if failed:
                    raise RuntimeError(f"packed members failed: {failed}")

        reset_window_peak(device, trim=True)   # the arm's own peak, also on CPU (gpu.measure's is the process')
        figures = timing(run_steps, len(trials) * args.seq)
        peak = window_peak_bytes(device)
        return {**figures, "setup_s": round(add_s, 3),
                "window_peak_gib": round(peak / 2 ** 30, 3) if peak is not None else None,
                "trainable": sum(member.trainable_params for member in pack.members.values()),
                "member_trainable": [member.trainable_params for member in pack.members.values()]}
    finally:
        pack.close()


def solo_arm(base, trials: List[Any], args, device, timing: Callable) -> Dict[str, Any]:
    from trainers import recipe

    parts, setup_s, trainable = [], 0.0, 0
    for settings in trials:
        started = time.perf_counter()
        trial = recipe.setup(settings, base)
        setup_s += time.perf_counter() - started
        try:
            def run_steps(count: int) -> None:
                recipe.train(trial, trial.engine.optimizer_steps + count)
            parts.append(timing(run_steps, args.seq))
            trainable += trial.trainable_params
        finally:
            recipe.cleanup(trial)
    return {**combined(parts, args), "setup_s": round(setup_s, 3), "trainable": trainable}


def solo_plain_arm(base, trials: List[Any], args, device, timing: Callable) -> Dict[str, Any]:
    parts, trainable = [], 0
    for settings in trials:
        peft_model = plain.add_lora(base.model, settings.peft.params["r"])
        try:
            loop = plain.PlainLoop(peft_model, 1, args.seq, seed=settings.training.seed)
            parts.append(timing(loop.run, args.seq))
            trainable += loop.trainable
        finally:
            peft_model.unload()
    return {**combined(parts, args), "trainable": trainable}


def combined(parts: List[Dict[str, Any]], args) -> Dict[str, Any]:
    """K trials timed one after another as one arm: their tokens over their summed seconds."""
    tokens = args.steps * args.seq * len(parts)
    seconds = sum(args.steps * args.seq / part["tokens_per_s"] for part in parts)
    joules = [part["j_per_ktok"] * args.steps * args.seq / 1000 for part in parts if part["j_per_ktok"] is not None]
    mfus = [part["mfu"] for part in parts]
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "step_s": round(seconds / args.steps, 4),    # the K trials' steps one after another
        "peak_gib": max(part["peak_gib"] for part in parts),
        "j_per_ktok": round(sum(joules) / tokens * 1000, 3) if len(joules) == len(parts) else None,
        # the same FLOPs per token in every trial: MFU over the summed time
        "mfu": round(sum(mfu * args.steps * args.seq / part["tokens_per_s"] for mfu, part in zip(mfus, parts))
                     / seconds, 4) if all(mfu is not None for mfu in mfus) else None,
        "per_trial_tokens_per_s": [part["tokens_per_s"] for part in parts],
    }


ARM_FUNCTIONS = {"packed": packed_arm, "solo": solo_arm, "solo-plain": solo_plain_arm}


def ranks_for(k: int, ranks: List[int]) -> List[int]:
    return [ranks[index % len(ranks)] for index in range(k)]


def run(args) -> Dict[str, Any]:
    from trainers.model import load_base
    from trainers.settings import ModelSettings
    from trainers.tiny_models import build_tiny_tokenizer

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    options = gpu.parse_options(args.options)
    started = time.time()
    summary: Dict[str, Any] = {"benchmark": "packed_throughput", "device": gpu.device_name(device),
                               "environment": gpu.environment(), "shape": args.shape, "seq": args.seq,
                               "warmup": args.warmup, "steps": args.steps, "options": options,
                               "peak_tflops": args.peak_tflops, "rows": []}

    def write() -> None:
        summary["wall_s"] = round(time.time() - started, 1)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)

    workdir = gpu.scratch_dir([args.shape])
    try:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        path = os.path.join(workdir, args.shape)
        model = plain.build_model(args.shape, device, dtype)
        model.save_pretrained(path)
        build_tiny_tokenizer(causal=True).save_pretrained(path)
        del model
        gpu.free_memory()
        data = gpu.write_data(workdir, args.warmup + args.steps, args.seq)
        base = load_base(ModelSettings(path, task="causal-lm", **options), device=device)
        flops = plain.flops_per_token(base.model.config, args.seq)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else None

        def timing(run_steps: Callable[[int], None], tokens_per_step: int) -> Dict[str, Any]:
            return gpu.measure(run_steps, device, args.warmup, args.steps, tokens_per_step, flops, peak)

        model = None
        if args.cost_model:
            model = probe_model(base, trial_settings(path, data, options, 0, max(args.ranks), args), args, summary)
            write()
        for k in args.ks:
            ranks = ranks_for(k, args.ranks)
            trials = [trial_settings(path, data, options, index, r, args) for index, r in enumerate(ranks)]
            row = {"K": k, "ranks": ranks, "arms": {}, "ratios": {}}
            summary["rows"].append(row)
            for arm in args.arms:
                try:
                    figures = ARM_FUNCTIONS[arm](base, trials, args, device, timing)
                except torch.OutOfMemoryError as exc:
                    figures = {"oom": True, "error": str(exc).splitlines()[0][:200]}
                except Exception as exc:  # one failing arm must not lose the others' figures
                    figures = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                gpu.free_memory()
                row["arms"][arm] = figures
                if arm == "packed" and model is not None and "tokens_per_s" in figures:
                    row["cost_model"] = predicted_vs_measured(model, figures, args)
                packed = row["arms"].get("packed")
                row["ratios"] = {f"packed/{name}": gpu.ratios(other, packed) for name, other in row["arms"].items()
                                 if name != "packed" and packed and "tokens_per_s" in packed
                                 and "tokens_per_s" in other}
                print(json.dumps({"K": k, "arm": arm, **figures}), flush=True)
                write()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write()
    print(markdown(summary))
    return summary


def probe_model(base, settings, args, summary: Dict[str, Any]):
    """Calibrate the cost model on this base and device at the largest rank (kept in summary["cost_model"])."""
    from trainers.packing.cost_model import CostModel
    from trainers.packing.probe import decide

    decision = decide(base, settings, k_max=max(args.ks), steps=args.steps, warmup=args.warmup)
    summary["cost_model"] = decision
    print(json.dumps({"cost_model_k": decision["k"], "reason": decision["reason"], "probe": decision["probe"]}),
          flush=True)
    return CostModel.from_dict(decision)


def predicted_vs_measured(model, figures: Dict[str, Any], args) -> Dict[str, Any]:
    """The model's peak and tokens/s for the arm's members (their own adapter sizes, batch 1 x seq) beside
    the arm's measurements, and their ratios (predicted / measured)."""
    from trainers.packing.cost_model import MemberShape

    members = [MemberShape(1, args.seq, trainable) for trainable in figures["member_trainable"]]
    predicted_gib, predicted_tps = model.memory_bytes(members) / 2 ** 30, model.tokens_per_s(members)
    measured_gib = figures.get("window_peak_gib")
    return {"predicted_peak_gib": round(predicted_gib, 3), "measured_peak_gib": measured_gib,
            "peak_ratio": round(predicted_gib / measured_gib, 3) if measured_gib else None,
            "predicted_tokens_per_s": round(predicted_tps, 1), "measured_tokens_per_s": figures["tokens_per_s"],
            "tokens_per_s_ratio": round(predicted_tps / figures["tokens_per_s"], 3)}


def markdown(summary: Dict[str, Any]) -> str:
    lines = [f"device: {summary['device']}, {summary['shape']}, K trials at batch 1 x seq {summary['seq']}, "
             f"{summary['steps']} timed steps",
             "| K | arm | tokens/s | step s | peak GiB | MFU | tokens/s packed/arm |", "|" + " --- |" * 7]
    for row in summary["rows"]:
        for arm, figures in row["arms"].items():
            ratio = (row["ratios"].get(f"packed/{arm}") or {}).get("tokens_per_s")
            if "error" in figures:
                cells = ["OOM" if figures.get("oom") else "err"] + ["-"] * 3
            else:
                cells = [f"{figures.get(key):g}" if figures.get(key) is not None else "-"
                         for key in ("tokens_per_s", "step_s", "peak_gib", "mfu")]
            lines.append(f"| {row['K']} | {arm} | " + " | ".join(cells) + f" | {ratio if ratio is not None else '-'} |")
    if "cost_model" in summary:
        decision = summary["cost_model"]
        lines += ["", f"cost model (probe {decision['probe_s']:.1f} s): would choose K={decision['k']} "
                      f"({decision['reason']})",
                  "| K | predicted peak GiB | measured peak GiB | predicted tokens/s | measured tokens/s |",
                  "|" + " --- |" * 5]
        for row in summary["rows"]:
            figures = row.get("cost_model")
            if figures:
                lines.append(f"| {row['K']} | {figures['predicted_peak_gib']} | {figures['measured_peak_gib']} | "
                             f"{figures['predicted_tokens_per_s']} | {figures['measured_tokens_per_s']} |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None):
    ints = lambda text: [int(item) for item in text.split(",") if item.strip()]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny LLaMA shape, short rows, K in {2, 4}")
    parser.add_argument("--shape", default=None, help="from: " + ", ".join(plain.SHAPES) + " (default llama-1b)")
    parser.add_argument("--ks", type=ints, default=None, help="pack sizes (default 8,16)")
    parser.add_argument("--ranks", type=ints, default=[4, 8, 16, 32, 64], help="LoRA ranks, cycled over the K trials")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--arms", type=lambda text: [arm for arm in text.split(",") if arm], default=list(ARMS),
                        help="comma-separated, from: " + ", ".join(ARMS))
    parser.add_argument("--options", default=None, help=f"speed options of the base (GPU default: {GPU_OPTIONS})")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (GPU default: 989)")
    parser.add_argument("--cost-model", action="store_true",
                        help="probe the cost model (trainers/packing/cost_model.py) and print its prediction per K beside "
                             "the packed arm's measurement")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/packed_throughput_<device>.json)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    cuda = args.device.startswith("cuda")
    small = args.tiny or not cuda
    args.shape = args.shape or ("llama-tiny" if args.tiny else "llama-1b")
    for name, large, tiny in (("ks", [8, 16], [2, 4]), ("seq", 512, 32), ("warmup", 3, 1), ("steps", 8, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else large)
    if args.options is None:
        args.options = GPU_OPTIONS if cuda else "gradient_checkpointing=false"
    if args.peak_tflops is None and cuda:
        args.peak_tflops = gpu.H100_BF16_DENSE_FLOPS / 1e12
    if args.out is None:
        name = gpu.slug(gpu.device_name(torch.device(args.device))) if not cuda or torch.cuda.is_available() else "cuda"
        args.out = os.path.join(gpu.RESULTS_DIR, f"packed_throughput_{name}.json")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
