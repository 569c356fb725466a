"""One trial, as a recipe: setup -> train -> evaluate -> report -> cleanup.

Every rank of a trial runs `run_trial` with the same settings. Training runs in `rounds` equal
slices of the optimizer steps (epochs * evals_per_epoch, ASHA's unit of time); after each slice
every rank evaluates its share of the eval set and calls `report` with the same, reduced metrics.
A trial ends at its last round, or earlier on a plateau of the watched eval metric (`Plateau`);
either way its last report carries `rounds_total` = its own round (a finished trial, which the
searcher counts as COMPLETE, not pruned), the `diag_*` diagnostics, and the saved adapter's size.
Every round is checkpointed before it is reported (trainers/checkpoint.py), so a trial stopped in a report
or a crash resumes after its last finished round: `run_trial(..., resume_from=output_dir)`.
Runs without Ray: `python -m trainers.recipe --settings settings.json --out DIR [--resume]`.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from trainers.checkpoint import load_round, restore_rng, save_round
from trainers.data import KEEP, TrialData, batch_stream, build_data, read_trial_rows
from trainers.deepspeed_config import precision_of
from trainers.diagnostics import RANK_KEYS, has_lora, overfit_gap, rank_figures
from trainers.distributed import DistContext, all_reduce, current_context
from trainers.engine import create_engine, zero3_load_config
from trainers.errors import TrialFailed
from trainers.generation import Question, base_round, generation_round, questions
from trainers.memory_guard import host_memory_cap
from trainers.model import LoadedBase, apply_adapter, load_base, release_adapter
from trainers.rounds import Losses, Plan, Plateau, eval_metrics, round_report, stop_on_plateau, write_metrics
from trainers.settings import TrialSettings
from trainers.system import TrainMeter, adapter_mb, count_trainable

ADAPTER_SUBDIR = "adapter"
DEEPSPEED_FILE = "deepspeed.json"   # the DeepSpeed config a trial ran with, for reproducing it
_OOM_ERRORS = tuple(error for error in (getattr(torch, "OutOfMemoryError", None), MemoryError) if error)


@dataclass
class Trial:
    """What the recipe's steps share: built by `setup`, torn down by `cleanup`."""
    settings: TrialSettings
    ctx: DistContext
    base: LoadedBase
    owns_base: bool                      # loaded here (dropped at the end) or lent by the caller (restored)
    data: TrialData
    peft_model: Any
    engine: Any
    plan: Plan
    meter: TrainMeter
    trainable_params: int
    stream: Iterator = None
    questions: List[Question] = field(default_factory=list)   # eval rows answered each round (generation)
    base_figures: Dict[str, Any] = field(default_factory=dict)  # the base model's answers and scores (base_*)
    micro_batches: int = 0
    losses: Losses = field(default_factory=Losses)
    phase: str = "setup"                 # where an out-of-memory happened, for its reason


def run_trial(settings: TrialSettings, report: Callable[[Dict[str, Any]], None], output_dir: str,
              base: Optional[LoadedBase] = None, resume_from: Optional[str] = None) -> Dict[str, Any]:
    """Train and evaluate one configuration; returns the final metrics (also written to metrics.json).

    `base`: a base model loaded earlier with `load_base` to reuse; its adapter is removed at the end.
    `resume_from`: the output_dir of an earlier, interrupted run of these settings (with as many workers):
    training continues after its last checkpointed round, and only the rounds after it are reported (or,
    if that round was the last, its metrics once more).
    Raises TrialFailed for divergence and out-of-memory.

    A plateau stop ends the trial after that round as if it were the last one: the adapter saved is
    the one of that (last) round, not of the best round, and the metrics reported are that round's.
    """
    plateau = Plateau.for_trial(settings)
    trial = None
    try:
        with _failures_as_trial_failed(lambda: trial.phase if trial else "setup"), \
                host_memory_cap(settings.engine.host_memory_mb):
            trial = setup(settings, base)
            write_engine_config(trial, output_dir)
            rounds = len(trial.plan.round_ends)
            metrics: Dict[str, Any] = {}
            done = 0
            if resume_from is not None:
                state = resume(trial, plateau, resume_from)
                if state["finished"]:   # it ended before whoever ran it heard the result: say it again
                    # marked as resumed (after its last round), unless an earlier resume marked it already
                    metrics = {"resumed_after_round": state["round"], **state["metrics"]}
                    report(metrics)
                    return metrics
                done = state["round"]
            if settings.generation.base_answers:
                trial.phase = "answering with the base model"
                trial.base_figures = base_round(trial.peft_model, trial.base.tokenizer, trial.questions,
                                                settings.generation, trial.ctx, trial.peft_model.disable_adapter(),
                                                synced=trial.ctx.world_size > 1)
            for number, end_step in enumerate(trial.plan.round_ends, start=1):
                if number <= done:
                    continue
                train(trial, end_step)
                metrics = {**round_report(number, trial.plan, trial.engine.optimizer_steps, trial.micro_batches,
                                          trial.losses), **evaluate(trial), **system_figures(trial)}
                if done:
                    metrics["resumed_after_round"] = done
                # the metrics are reduced over ranks, so every rank stops at the same round
                stopped = stop_on_plateau(plateau, metrics, number, rounds)
                if stopped or number == rounds:
                    metrics.update(diagnose(trial, metrics))
                    metrics["adapter_mb"] = save(trial, output_dir, metrics)
                checkpoint(trial, plateau, output_dir, number, metrics, finished=stopped or number == rounds)
                report(metrics)
                if stopped:
                    break
            return metrics
    except BaseException as exc:
        # An exception raised in a step (divergence, out of memory, a stop) keeps train()'s frame, with the
        # engine and the last batch's activations, alive as long as the caller holds it: clear the finished
        # frames so that cleanup frees that memory now.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if trial is not None:
            cleanup(trial)


def setup(settings: TrialSettings, base: Optional[LoadedBase] = None) -> Trial:
    ctx = current_context()
    if settings.engine.num_threads:
        torch.set_num_threads(settings.engine.num_threads)
    seed_everything(settings.training.seed)
    rows = read_trial_rows(settings.data, settings.model.task)
    num_labels = len(rows.labels) if rows.labels else None
    owns_base = base is None
    if base is None:
        base = load_base(settings.model, num_labels=num_labels, device=ctx.device,
                         zero3_config=zero3_load_config(settings, ctx.device))
    elif base.task != settings.model.task or base.num_labels != num_labels:
        raise ValueError(f"the lent base is a {base.task} model with num_labels={base.num_labels}; this trial "
                         f"needs {settings.model.task} with num_labels={num_labels}")
    if rows.labels:
        base.model.config.label2id = dict(rows.labels)
        base.model.config.id2label = {index: label for label, index in rows.labels.items()}
    data = build_data(rows, settings.data, base.tokenizer, settings.model.task, settings.training.batch_size,
                      settings.training.seed, ctx)
    asked = questions(rows.eval, base.tokenizer, settings.data, rows.format, settings.generation)
    # Seed again: a reused base must not change how the adapter starts.
    seed_everything(settings.training.seed)
    peft_model = apply_adapter(base, settings.peft, settings.model.task)
    try:
        trainable = count_trainable(peft_model)   # before DeepSpeed, which partitions parameters under ZeRO-3
        plan = Plan.for_trial(settings, len(data.train))
        engine = create_engine(peft_model, settings.training, settings.engine, plan.total_steps,
                               precision=precision_of(str(base.dtype)))
    except BaseException:
        if not owns_base:   # hand a lent base back clean even when the trial never starts
            base.model = release_adapter(peft_model)
        raise
    engine.model.train()
    return Trial(settings=settings, ctx=ctx, base=base, owns_base=owns_base, data=data, peft_model=peft_model,
                 engine=engine, plan=plan, meter=TrainMeter(ctx.device), trainable_params=trainable,
                 stream=batch_stream(data), questions=asked)


def train(trial: Trial, end_step: int) -> None:
    """Optimizer steps up to `end_step`; a diverged loss fails the trial before the round is checkpointed.

    Each step's loss is read one step late, after the next step's forward and backward are queued: reading
    it at once (`.item()`) would make the CPU wait for the GPU every step and leave the GPU idle while the
    next kernels are launched (6-14% of a 1B model's step on an H100, benchmarks/gpu_throughput.py).
    """
    engine, meter = trial.engine, trial.meter
    meter.start()
    unread = None   # (step, loss tensor) not yet checked
    while engine.optimizer_steps < end_step:
        step = engine.optimizer_steps + 1
        trial.phase = f"step {step}"
        _, batch = next(trial.stream)
        outputs = engine.model(**_to_device(batch, trial.ctx.device))
        engine.backward(outputs.loss)
        if unread is not None:
            check_loss(trial, *unread)
        engine.step()
        meter.tokens += int(batch["attention_mask"].sum())
        trial.micro_batches += 1
        unread = (step, outputs.loss.detach())
    if unread is not None:
        check_loss(trial, *unread)
    meter.stop()


def check_loss(trial: Trial, step: int, loss_tensor: torch.Tensor) -> None:
    """Record a step's loss; a NaN/inf or a loss 100x the first fails the trial (`diverged at step k`).

    The loss is averaged over ranks, so all ranks see a divergence at the same step and stop together
    (one rank raising alone would hang the others in the next collective)."""
    diverged = trial.losses.add(all_reduce([loss_tensor.item()])[0] / trial.ctx.world_size, step)
    if diverged:
        raise TrialFailed(diverged)


@torch.no_grad()
def evaluate(trial: Trial) -> Dict[str, Any]:
    """The eval metrics, and where the rows have reference answers the generation round's (trainers/generation.py)
    with the base model's beside them (in every report, so that the last one carries them too)."""
    trial.phase = f"eval after step {trial.engine.optimizer_steps}"
    model = trial.engine.model
    metrics: Dict[str, Any] = eval_metrics(
        model, trial.data.eval, trial.settings.model.task, trial.base.num_labels,
        lambda batch: model(**_to_device({key: batch[key] for key in ("input_ids", "attention_mask")},
                                         trial.ctx.device)).logits)
    if trial.questions:
        trial.phase = f"generating answers after step {trial.engine.optimizer_steps}"
        metrics.update(generation_round(trial.peft_model, trial.base.tokenizer, trial.questions,
                                        trial.settings.generation, trial.ctx, synced=trial.ctx.world_size > 1))
    return {**metrics, **trial.base_figures}


def diagnose(trial: Trial, metrics: Dict[str, Any]) -> Dict[str, float]:
    """diag_* figures of the last round (trainers/diagnostics.py), the same keys and values on every rank.

    The LoRA rank figures come from rank 0 (inside gathered_params: ZeRO-3 partitions the weights) and
    reach the others by a sum with their zeros; whether there are any is read from the module tree,
    which every rank shares.
    """
    trial.phase = "diagnostics"
    figures = overfit_gap(metrics)
    if has_lora(trial.peft_model):
        with trial.engine.gathered_params():      # every rank enters: ZeRO-3 gathers collectively
            ranks = rank_figures(trial.peft_model) if trial.ctx.is_main else dict.fromkeys(RANK_KEYS, 0.0)
        figures.update(zip(RANK_KEYS, all_reduce([ranks[key] for key in RANK_KEYS])))
    return figures


def system_figures(trial: Trial) -> Dict[str, Any]:
    return {**trial.meter.figures(), "trainable_params": trial.trainable_params}


def save(trial: Trial, output_dir: str, metrics: Dict[str, Any]) -> float:
    """Rank 0 writes the adapter (safetensors) and metrics.json; returns the adapter's MiB on every rank."""
    trial.phase = "saving the adapter"
    adapter_dir = os.path.join(output_dir, ADAPTER_SUBDIR)
    with trial.engine.gathered_params():          # every rank enters: ZeRO-3 gathers collectively
        if trial.ctx.is_main:
            trial.peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    size = adapter_mb(adapter_dir) if trial.ctx.is_main else 0.0
    size = all_reduce([size])[0]                  # also keeps the others waiting until the save is done
    if trial.ctx.is_main:
        write_metrics(output_dir, {**metrics, "adapter_mb": size}, trial.engine.name, trial.ctx.world_size)
    return size


def cleanup(trial: Trial) -> None:
    """Free the trial's memory (engine, optimizer, adapter, data; the base if it was loaded here); a lent
    base gets its adapter removed, ready for the next trial."""
    destroy = getattr(trial.engine.model, "destroy", None)   # DeepSpeed: hooks and buffers
    if callable(destroy):
        with contextlib.suppress(Exception):
            destroy()
    trial.engine = trial.stream = trial.data = None
    if not trial.owns_base:
        trial.base.model = release_adapter(trial.peft_model)
    else:
        trial.base = None   # the caller may hold this Trial (through an exception) long after
    trial.peft_model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_engine_config(trial: Trial, output_dir: str) -> None:
    """Rank 0 writes the DeepSpeed config the engine runs with (generated and merged) as deepspeed.json."""
    config = getattr(trial.engine, "config", None)
    if trial.ctx.is_main and config is not None:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, DEEPSPEED_FILE), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)


def checkpoint(trial: Trial, plateau: Plateau, output_dir: str, number: int, metrics: Dict[str, Any],
               finished: bool) -> None:
    """Round `number`'s checkpoint: the engine's state and what the recipe needs to go on from here."""
    trial.phase = f"checkpoint after round {number}"
    save_round(trial.engine, trial.ctx, output_dir, number, {
        "round": number, "finished": finished, "metrics": metrics,
        "optimizer_steps": trial.engine.optimizer_steps, "micro_batches": trial.micro_batches,
        "first_loss": trial.losses.first, "plateau_best": plateau.best, "plateau_stale_rounds": plateau.stale_rounds})


def resume(trial: Trial, plateau: Plateau, resume_from: str) -> Dict[str, Any]:
    """Restore the last checkpointed round under `resume_from` into a freshly set-up trial; returns its state."""
    trial.phase = "resuming"
    state = load_round(trial.engine, trial.ctx, resume_from)
    trial.engine.optimizer_steps = state["optimizer_steps"]
    trial.engine.micro_steps = trial.micro_batches = state["micro_batches"]
    trial.losses.first = state["first_loss"]
    plateau.best, plateau.stale_rounds = state["plateau_best"], state["plateau_stale_rounds"]
    # The train order depends only on (seed, epoch): skipping the micro-batches already trained on puts this
    # run on the batch the interrupted one would have read next (collating them costs no model compute).
    # The RNG comes back after the skip: a DataLoader draws a seed from it whenever an epoch starts.
    trial.stream = batch_stream(trial.data)
    for _ in range(trial.micro_batches):
        next(trial.stream)
    restore_rng(state["directory"], trial.ctx)
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass


@contextlib.contextmanager
def _failures_as_trial_failed(phase: Callable[[], str]):
    """Out-of-memory (CUDA or host) -> TrialFailed naming where it happened."""
    try:
        yield
    except (*_OOM_ERRORS, RuntimeError) as exc:
        # Some CUDA allocation failures (cuBLAS workspaces, NCCL buffers) arrive as a plain RuntimeError.
        if not isinstance(exc, _OOM_ERRORS) and "out of memory" not in str(exc).lower():
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise TrialFailed(f"out of memory at {phase()}: {message[:300]}") from exc


def _to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items() if key != KEEP}


def main(argv: Optional[List[str]] = None) -> int:
    """Run one trial without Ray. Under torchrun (RANK / WORLD_SIZE set) the ranks form a group first."""
    import argparse
    import sys

    from trainers.settings_io import SettingsError, settings_from_dict

    parser = argparse.ArgumentParser(prog="python -m trainers.recipe", description=main.__doc__)
    parser.add_argument("--settings", required=True, help="JSON file: {model, data, peft, training, engine}")
    parser.add_argument("--out", required=True, help="output directory (adapter/, metrics.json, checkpoint/)")
    parser.add_argument("--resume", action="store_true", help="continue after the last round checkpointed in --out")
    args = parser.parse_args(argv)
    try:
        with open(args.settings, encoding="utf-8") as handle:
            settings = settings_from_dict(json.load(handle))
    except (OSError, json.JSONDecodeError, SettingsError) as exc:
        print(f"{args.settings}: {exc}", file=sys.stderr)
        return 2
    started_group = _init_group_from_env()
    os.makedirs(args.out, exist_ok=True)
    rank = current_context().rank

    def report(metrics: Dict[str, Any]) -> None:
        if rank == 0:
            print(json.dumps(metrics), flush=True)

    try:
        run_trial(settings, report, args.out, resume_from=args.out if args.resume else None)
        return 0
    except TrialFailed as exc:
        print(f"TrialFailed: {exc.reason}", file=sys.stderr)
        return 1
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def _init_group_from_env() -> bool:
    import torch.distributed as dist

    # torchrun sets these; world size 1 still forms a group, so that the DeepSpeed path can be tried alone
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
