"""GPU throughput: our trainer's training step next to a plain HF + PEFT loop, same process, same models.

Both arms train the same random-init LLaMA-shaped models (1B and 8B shapes) with LoRA in bf16 at r in
{1, 8, 64, 256} and QLoRA (NF4) at r in {8, 64}, on batches of 8 x 512 tokens:
  plain  benchmarks/plain_peft_loop.py, which does what shared/anchors/gpu_peft_baseline.py does;
  ours   the product's code path: trainers.model.load_base (with the speed options of trainers/kernels.py)
         and trainers.recipe's setup -> train -> cleanup on one process (PlainEngine: AdamW, LR schedule,
         gradient clipping, the recipe's per-step loss check), on a lent base as a Ray worker reuses it.
Each arm is timed the same way: warm-up steps, then `--steps` steps between two device synchronisations;
peak memory is torch's peak allocation over the timed steps, energy the GPU's NVML counter.

    python benchmarks/gpu_throughput.py                        # CUDA: both shapes, ratios ours / plain
    python benchmarks/gpu_throughput.py --device cpu --tiny    # the same code on a tiny LLaMA, in seconds

Writes benchmarks/results/gpu_throughput_<device>.json (after every measurement, so a run cut short keeps
what it measured) and prints a markdown table last. No Ray, DeepSpeed or Optuna is imported.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import plain_peft_loop as plain  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
H100_BF16_DENSE_FLOPS = 989e12   # the anchor's MFU denominator (H100 SXM bf16 dense; the H200's is the same)
# What the plain loop measured on an H100 (issue 4): to check our plain loop against the anchor.
ANCHOR_H100 = {("llama-8b", "lora-bf16", 8): {"tokens_per_s": 11500, "mfu": 0.36, "peak_gib": 46.0},
               ("llama-8b", "qlora-nf4", 8): {"tokens_per_s": 10400, "mfu": 0.32, "peak_gib": 36.4},
               ("llama-1b", "lora-bf16", 8): {"tokens_per_s": 42500, "mfu": 0.22}}
# The options our arm trains with on a GPU; kernels.py documents each.
GPU_OPTIONS = "liger_kernel=true,autocast=true,gradient_checkpointing=false"
SPEED_FIELDS = ("attn_implementation", "liger_kernel", "autocast", "gradient_checkpointing", "compile")
METRICS = ("tokens_per_s", "mfu", "peak_gib", "j_per_ktok")


def parse_options(text: str) -> Dict[str, Any]:
    """'liger_kernel=true,compile=false' -> ModelSettings speed fields (true/false/none or a string)."""
    options: Dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in SPEED_FIELDS:
            raise ValueError(f"unknown speed option {key!r}; known: {', '.join(SPEED_FIELDS)}")
        lowered = value.strip().lower()
        options[key] = {"true": True, "1": True, "false": False, "0": False, "none": None}.get(lowered, value.strip())
    return options


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run_steps: Callable[[int], None], device: torch.device, warmup: int, steps: int,
            tokens_per_step: int, flops_per_token: float, peak_flops: Optional[float]) -> Dict[str, Any]:
    """Figures of `steps` steps after `warmup` ones; the same harness times every arm."""
    from trainers.system import energy_counter, peak_mem_mb, reset_peak_mem

    run_steps(warmup)
    synchronize(device)
    reset_peak_mem(device)
    counter = energy_counter(device)
    energy_start = counter.read() if counter else None
    started = time.perf_counter()
    run_steps(steps)
    synchronize(device)
    seconds = time.perf_counter() - started
    joules = counter.read() - energy_start if counter else None
    tokens = tokens_per_step * steps
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "step_s": round(seconds / steps, 4),
        # CUDA: peak allocation over the timed steps; CPU: the process's peak RSS so far
        "peak_gib": round(peak_mem_mb(device) / 1024, 3),
        "j_per_ktok": round(joules / tokens * 1000, 3) if joules is not None else None,
        "mfu": round(flops_per_token * tokens / seconds / peak_flops, 4) if peak_flops else None,
    }


@contextlib.contextmanager
def stock_llama_module():
    """Liger patches module globals of modeling_llama (its RoPE function, norm and MLP classes) besides the
    model instance; put them back after our arm so that every later plain arm runs stock transformers."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    try:
        yield
    finally:
        for name in set(vars(modeling_llama)) - set(saved):
            delattr(modeling_llama, name)
        for name, value in saved.items():
            setattr(modeling_llama, name, value)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Bench:
    """One run: the settings, the rows measured so far, and the JSON file they are written to."""

    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.started = time.time()
        self.arms = {"plain": None, **({"plain-synced": None} if args.plain_synced else {}),
                     "ours": parse_options(args.ours)}
        for spec in args.extra_arm:
            name, _, options = spec.partition("=")
            self.arms[name] = parse_options(options)
        self.rows: List[Dict[str, Any]] = []
        self.peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else None

    def over_budget(self) -> bool:
        return time.time() - self.started > self.args.budget_s

    def row(self, shape: str, method: str, r: int) -> Dict[str, Any]:
        for row in self.rows:
            if (row["model"], row["method"], row["r"]) == (shape, method, r):
                return row
        row = {"model": shape, "method": method, "r": r, "arms": {}, "ratios": {}}
        self.rows.append(row)
        return row

    def record(self, shape: str, method: str, r: int, arm: str, figures: Dict[str, Any]) -> None:
        row = self.row(shape, method, r)
        row["arms"][arm] = figures
        base = row["arms"].get("plain")
        row["ratios"] = {name: ratios(base, other) for name, other in row["arms"].items()
                         if name != "plain" and base is not None}
        print(json.dumps({"model": shape, "method": method, "r": r, "arm": arm, **figures}), flush=True)
        self.write()

    def run_one(self, shape: str, method: str, r: int, arm: str, run: Callable[[], Dict[str, Any]]) -> None:
        if self.over_budget():
            self.record(shape, method, r, arm, {"skipped": "over --budget-s"})
            return
        try:
            figures = run()
        except torch.OutOfMemoryError as exc:
            figures = {"oom": True, "error": str(exc).splitlines()[0][:200]}
        except Exception as exc:  # one failing configuration must not lose the others' figures
            figures = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        free_memory()
        self.record(shape, method, r, arm, figures)

    def measure(self, run_steps: Callable[[int], None], config) -> Dict[str, Any]:
        args = self.args
        return measure(run_steps, self.device, args.warmup, args.steps, args.batch * args.seq,
                       plain.flops_per_token(config, args.seq), self.peak_flops)

    def summary(self) -> Dict[str, Any]:
        return {"benchmark": "gpu_throughput", "device": device_name(self.device), "environment": environment(),
                "batch": self.args.batch, "seq": self.args.seq, "warmup": self.args.warmup, "steps": self.args.steps,
                "peak_tflops": self.args.peak_tflops, "arms": self.arms, "wall_s": round(time.time() - self.started, 1),
                "rows": self.rows, "targets": targets(self.rows) if self.device.type == "cuda" else [],
                "anchor_check": anchor_check(self.rows)}

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
        with open(self.args.out, "w", encoding="utf-8") as handle:
            json.dump(self.summary(), handle, indent=2)


def ratios(base: Dict[str, Any], other: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """other / base per metric (tokens/s and MFU: higher is better; peak GiB and J/1k tokens: lower is)."""
    out = {}
    for metric in METRICS:
        a, b = base.get(metric), other.get(metric)
        out[metric] = round(b / a, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None
    return out


def plain_lora_arm(bench: Bench, shape: str, model, ranks: List[int], method: str = "lora-bf16") -> None:
    for r in ranks:
        for arm in [name for name in bench.arms if name.startswith("plain")]:
            def run():
                peft_model = plain.add_lora(model, r)
                try:
                    loop = plain.PlainLoop(peft_model, bench.args.batch, bench.args.seq,
                                           synchronize_each_step=arm == "plain-synced")
                    return {**bench.measure(loop.run, model.config), "trainable": loop.trainable}
                finally:
                    peft_model.unload()   # the anchor's way back to the bare base for the next rank
            bench.run_one(shape, method, r, arm, run)


def ours_arm(bench: Bench, shape: str, path: str, quantization: str, ranks: List[int], arm: str,
             data: Dict[str, str]) -> None:
    """Our trainer: load_base once (as a Ray worker does), then per rank the recipe's setup, train, cleanup."""
    from trainers import recipe
    from trainers.model import load_base
    from trainers.settings import (DataSettings, EngineSettings, ModelSettings, PeftSettings, TrainingSettings,
                                   TrialSettings)

    args = bench.args
    method = "qlora-nf4" if quantization == "nf4" else "lora-bf16"
    model_settings = ModelSettings(path, task="causal-lm", quantization=quantization, **bench.arms[arm])
    if model_settings.compile:
        # Each base model loaded here adds compiled entries for the same block code; past dynamo's recompile
        # limit (8) blocks silently run eager, which a worker training one base never reaches.
        torch._dynamo.reset()
    with stock_llama_module():
        try:
            base = load_base(model_settings, device=bench.device)
        except Exception as exc:
            for r in ranks:
                bench.record(shape, method, r, arm, {"error": f"load_base: {type(exc).__name__}: {str(exc)[:300]}"})
            return
        for r in ranks:
            settings = TrialSettings(
                model=model_settings,
                data=DataSettings(train=data["train"], eval=data["eval"], label_field=None, max_length=args.seq),
                peft=PeftSettings("lora", {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
                                           "target_modules": list(plain.LORA_TARGETS)}),
                training=TrainingSettings(learning_rate=2e-4, epochs=1, batch_size=args.batch, warmup_ratio=0.0,
                                          max_steps=args.warmup + args.steps),
                engine=EngineSettings(deepspeed=False))

            def run():
                trial = recipe.setup(settings, base)
                try:
                    def run_steps(count: int) -> None:
                        recipe.train(trial, trial.engine.optimizer_steps + count)
                    return {**bench.measure(run_steps, base.model.config), "trainable": trial.trainable_params}
                finally:
                    recipe.cleanup(trial)
            bench.run_one(shape, method, r, arm, run)


def plain_qlora_arm(bench: Bench, shape: str, path: str, ranks: List[int]) -> None:
    if not ranks:
        return
    try:
        model = plain.load_nf4(path, bench.device)
    except Exception as exc:
        for r in ranks:
            bench.record(shape, "qlora-nf4", r, "plain", {"error": f"load: {type(exc).__name__}: {str(exc)[:300]}"})
        return
    plain_lora_arm(bench, shape, model, ranks, "qlora-nf4")
    del model
    free_memory()


def write_data(workdir: str, rows: int, seq: int) -> Dict[str, str]:
    """Rows of `seq` single-token words: each tokenizes to exactly `seq` tokens, so no batch is padded."""
    from trainers.tiny_models import VOCAB

    words = [word for word in VOCAB if word.isalpha()]
    rng = random.Random(0)
    paths = {}
    for name, count in (("train", rows), ("eval", 1)):
        paths[name] = os.path.join(workdir, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as handle:
            for _ in range(count):
                handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq))}) + "\n")
    return paths


def run_shape(bench: Bench, shape: str, workdir: str) -> None:
    from trainers.tiny_models import build_tiny_tokenizer

    args = bench.args
    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    model = plain.build_model(shape, bench.device, dtype)
    path = os.path.join(workdir, shape)
    model.save_pretrained(path)               # our arm and both QLoRA arms load it as a checkpoint
    build_tiny_tokenizer(causal=True).save_pretrained(path)
    data = write_data(workdir, args.batch * (args.warmup + args.steps), args.seq)
    plain_lora_arm(bench, shape, model, args.lora_ranks)
    del model
    free_memory()
    ours_arms = [name for name in bench.arms if not name.startswith("plain")]
    for arm in ours_arms:
        ours_arm(bench, shape, path, "none", args.lora_ranks, arm, data)
        free_memory()   # the arm's base is unreferenced once it returns
    if args.qlora_ranks:
        plain_qlora_arm(bench, shape, path, args.qlora_ranks)
        for arm in ours_arms:
            ours_arm(bench, shape, path, "nf4", args.qlora_ranks, arm, data)
            free_memory()
    shutil.rmtree(path, ignore_errors=True)


def targets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, each with the figures it was judged on."""
    def figures(shape, method, r, arm):
        for row in rows:
            if (row["model"], row["method"], row["r"]) == (shape, method, r):
                return row["arms"].get(arm) or {}
        return {}

    slower = [f"{row['model']} {row['method']} r={row['r']}: {row['ratios']['ours']['tokens_per_s']}"
              for row in rows if (row["ratios"].get("ours") or {}).get("tokens_per_s") is not None
              and row["ratios"]["ours"]["tokens_per_s"] < 1.0]
    compared = sum(1 for row in rows if (row["ratios"].get("ours") or {}).get("tokens_per_s") is not None)
    lora = figures("llama-8b", "lora-bf16", 8, "ours")
    qlora, qlora_plain = figures("llama-8b", "qlora-nf4", 8, "ours"), figures("llama-8b", "qlora-nf4", 8, "plain")

    def check(value, ok):
        return None if value is None else bool(ok(value))

    return [
        {"target": "ours never slower than plain (tokens/s ratio >= 1 on every row)",
         "met": (not slower) if compared else None, "rows_compared": compared, "slower_rows": slower},
        {"target": "8B LoRA r=8 MFU >= 0.45", "value": lora.get("mfu"), "met": check(lora.get("mfu"), lambda v: v >= 0.45)},
        {"target": "8B LoRA r=8 peak <= 35 GiB", "value": lora.get("peak_gib"),
         "met": check(lora.get("peak_gib"), lambda v: v <= 35)},
        {"target": "8B QLoRA r=8 peak <= 26 GiB", "value": qlora.get("peak_gib"),
         "met": check(qlora.get("peak_gib"), lambda v: v <= 26)},
        {"target": "8B QLoRA r=8 tokens/s >= plain", "value": qlora.get("tokens_per_s"),
         "plain": qlora_plain.get("tokens_per_s"),
         "met": check(qlora.get("tokens_per_s") if qlora_plain.get("tokens_per_s") else None,
                      lambda v: v >= qlora_plain["tokens_per_s"])},
    ]


def anchor_check(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Our plain loop over the anchor's H100 figures (meaningful on an H100)."""
    out = []
    for row in rows:
        reference = ANCHOR_H100.get((row["model"], row["method"], row["r"]))
        measured = row["arms"].get("plain") or {}
        if reference and any(measured.get(key) is not None for key in reference):
            out.append({"model": row["model"], "method": row["method"], "r": row["r"], "anchor": reference,
                        "plain_over_anchor": ratios(reference, measured)})
    return out


def markdown(summary: Dict[str, Any]) -> str:
    arms = [name for name in summary["arms"] if name != "plain"]
    header = "| model | method | r | " + " | ".join(
        f"{metric} plain | " + " | ".join(f"{metric} {arm} (x)" for arm in arms) for metric in METRICS) + " |"
    lines = [f"device: {summary['device']}, batch {summary['batch']} x seq {summary['seq']}, "
             f"{summary['steps']} timed steps", header, "|" + " --- |" * (3 + len(METRICS) * (1 + len(arms)))]

    def cell(figures: Dict[str, Any], metric: str) -> str:
        if figures.get("oom"):
            return "OOM"
        if "error" in figures or "skipped" in figures:
            return "err" if "error" in figures else "skip"
        value = figures.get(metric)
        return "-" if value is None else f"{value:g}"

    for row in summary["rows"]:
        cells = [row["model"], row["method"], str(row["r"])]
        for metric in METRICS:
            cells.append(cell(row["arms"].get("plain", {}), metric))
            for arm in arms:
                ratio = (row["ratios"].get(arm) or {}).get(metric)
                cells.append(cell(row["arms"].get(arm, {}), metric) + (f" ({ratio:g})" if ratio is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    for target in summary["targets"]:
        lines.append(f"- {target['target']}: {'MET' if target['met'] else 'NOT MET' if target['met'] is False else 'n/a'}"
                     f" ({target.get('value', target.get('slower_rows'))})")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment() -> Dict[str, Optional[str]]:
    import importlib.metadata

    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["cuda"] = torch.version.cuda
    return versions


def scratch_dir(shapes: List[str]) -> str:
    """Where the checkpoints go: RAM-backed /dev/shm when it holds the largest bf16 model twice over."""
    largest = max(_param_bytes(shape) for shape in shapes)
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * largest:
        return tempfile.mkdtemp(prefix="gpu_throughput_", dir="/dev/shm")
    return tempfile.mkdtemp(prefix="gpu_throughput_")


def _param_bytes(shape: str) -> int:
    """bf16 bytes of a shape's weights (untied embeddings and head)."""
    config = plain.SHAPES[shape]
    d, f, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = d * config["num_key_value_heads"] // config["num_attention_heads"]
    return 2 * (layers * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * d * vocab)


def parse_args(argv: Optional[List[str]] = None):
    ints = lambda text: [int(item) for item in text.split(",") if item.strip()]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny LLaMA shape with small batches (CPU path)")
    parser.add_argument("--shapes", type=lambda text: text.split(","), default=None,
                        help="comma-separated, from: " + ", ".join(plain.SHAPES))
    parser.add_argument("--lora-ranks", type=ints, default=[1, 8, 64, 256])
    parser.add_argument("--qlora-ranks", type=ints, default=[8, 64])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--ours", default=None, help=f"our arm's speed options (GPU default: {GPU_OPTIONS})")
    parser.add_argument("--extra-arm", action="append", default=[], metavar="NAME=OPTIONS",
                        help="another arm of our trainer with other speed options, e.g. 'compiled=compile=true,...'")
    parser.add_argument("--plain-synced", action="store_true",
                        help="also time the plain loop reading the loss and synchronising every step, as the recipe "
                             "does (shows what those host-device round trips cost)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (GPU default: 989)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip what would start after this")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_throughput_<device>.json)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    small = args.tiny or not cuda
    args.shapes = args.shapes or (["llama-tiny"] if args.tiny else ["llama-8b", "llama-1b"])
    for name, large, tiny in (("batch", 8, 2), ("seq", 512, 32), ("warmup", 3, 1), ("steps", 8, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else large)
    if args.ours is None:
        args.ours = GPU_OPTIONS if cuda else "gradient_checkpointing=false"
    if args.peak_tflops is None and cuda:
        args.peak_tflops = H100_BF16_DENSE_FLOPS / 1e12
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.out = args.out or os.path.join(RESULTS_DIR, f"gpu_throughput_{slug(device_name(device))}.json")
    bench = Bench(args, device)
    workdir = scratch_dir(args.shapes)
    try:
        for shape in args.shapes:
            run_shape(bench, shape, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = bench.summary()
    bench.write()
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
