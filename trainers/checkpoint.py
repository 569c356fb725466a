"""Per-round checkpoints of a trial, so that a stopped or crashed trial continues where it left off.

After each eval round every rank calls `save_round`; OUTPUT_DIR/checkpoint/ then holds

    round-NNNN/                 the newest finished round (older ones are removed once it is complete):
      adapter.safetensors       the trained parameters          } plain engine, written by rank 0
      optimizer.pt              optimizer, LR schedule, scaler  } (DDP ranks hold the same state)
      engine/                   DeepSpeed's checkpoint instead: every rank writes its ZeRO partition
      rng-RANK.pt               each rank's torch RNG states, so dropout draws on as in an unbroken run
      state.json                the recipe's counters (steps, micro-batches), its plateau state, the round's metrics
    latest                      the name of that folder, written last (a half-written round is never read)

`load_round` (every rank) restores the engine and returns state.json's contents; `restore_rng` then sets
this rank's RNG (last: reading the data up to where the run stopped draws from it, see recipe.resume).
Files are read back with torch.load(weights_only=True) (DeepSpeed's too: trainers.engine.weights_only_load
replaces its loader, which would unpickle anything), so a checkpoint cannot run code when it is loaded.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict

import torch

from trainers.distributed import DistContext, barrier

CHECKPOINT_SUBDIR = "checkpoint"
LATEST_FILE = "latest"
STATE_FILE = "state.json"


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_SUBDIR)


def save_round(engine, ctx: DistContext, output_dir: str, number: int, state: Dict[str, Any]) -> str:
    """Write round `number`'s checkpoint (every rank calls this); returns its folder."""
    root = checkpoint_root(output_dir)
    directory = os.path.join(root, f"round-{number:04d}")
    if ctx.is_main:
        shutil.rmtree(directory, ignore_errors=True)   # left by an earlier attempt at this round
        os.makedirs(directory)
    barrier()
    engine.save_state(directory, ctx.is_main)
    torch.save(_rng_state(), os.path.join(directory, f"rng-{ctx.rank}.pt"))
    barrier()                                          # every rank's part is on disk before `latest` names it
    if ctx.is_main:
        with open(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump({**state, "world_size": ctx.world_size}, handle, indent=2)
        _write_atomically(os.path.join(root, LATEST_FILE), os.path.basename(directory))
        for name in os.listdir(root):
            if name.startswith("round-") and name != os.path.basename(directory):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return directory


def has_checkpoint(output_dir: str) -> bool:
    """Whether `output_dir` holds a finished round to resume from."""
    return os.path.isfile(os.path.join(checkpoint_root(output_dir), LATEST_FILE))


def load_round(engine, ctx: DistContext, resume_from: str) -> Dict[str, Any]:
    """Restore the newest round checkpointed under `resume_from` (an earlier run's output_dir)."""
    root = checkpoint_root(resume_from)
    try:
        with open(os.path.join(root, LATEST_FILE), encoding="utf-8") as handle:
            directory = os.path.join(root, handle.read().strip())
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"resume_from: {resume_from} holds no complete checkpoint "
                                f"({CHECKPOINT_SUBDIR}/{LATEST_FILE} and its {STATE_FILE}): {exc}") from exc
    if state["world_size"] != ctx.world_size:
        # ZeRO partitions and the data shards both follow the number of ranks.
        raise ValueError(f"resume_from: {directory} was written by {state['world_size']} workers; resume it "
                         f"with as many, not {ctx.world_size}")
    engine.load_state(directory)
    return {**state, "directory": directory}


def restore_rng(directory: str, ctx: DistContext) -> None:
    """This rank's torch RNG states as they were when round checkpoint `directory` was written."""
    state = torch.load(os.path.join(directory, f"rng-{ctx.rank}.pt"), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_state() -> Dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)
