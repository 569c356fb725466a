"""Where this process sits in a (maybe) distributed trial, and the few collectives the recipe needs.

Without an initialized torch.distributed group every helper is the single-process identity, so the
recipe has one code path. Ray Train (or torchrun) initializes the group before the recipe starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_context() -> DistContext:
    """Rank, world size and the device this rank trains on (cuda:LOCAL_RANK where there is a GPU)."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # Ray Train sets CUDA_VISIBLE_DEVICES per worker, so the local index may be out of range
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo only CPU ones.
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: Sequence[float], op: str = "sum") -> List[float]:
    """Element-wise sum or max of `values` over all ranks (float64, so token counts stay exact)."""
    if not _initialized():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank."""
    if not _initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
