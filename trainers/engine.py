"""Optimizer steps for one trial: a plain torch path and a DeepSpeed ZeRO path, one interface.

Both paths use torch's AdamW and the same warmup + cosine LambdaLR, so a trial's result does not
depend on which path ran it (DeepSpeed's fused/CPU Adam would need compiled ops on every worker).
The recipe calls, per micro-batch: `outputs = engine.model(**batch)`, `engine.backward(loss)`,
`engine.step()`; `step()` returns True when an optimizer step happened (every
gradient_accumulation_steps micro-batches).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Dict, List

import torch

from trainers.settings import EngineSettings, TrainingSettings

# Parameters that get no weight decay: decaying a bias or a norm's gain has no regularising
# meaning, and IA3 / DoRA scaling vectors would be pulled towards 0 (switching features off).
_NO_DECAY_MARKERS = ("bias", "norm", "ia3_l", "lora_magnitude_vector")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if param.ndim < 2 or any(marker in lowered for marker in _NO_DECAY_MARKERS):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def warmup_cosine(total_steps: int, warmup_ratio: float):
    """LR factor per optimizer step: linear warmup over ceil(warmup_ratio * total) steps, then cosine to 0.

    Warmup starts at 1/(warmup+1), not 0, so that the first step of a short trial is not wasted.
    """
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: torch.nn.Module, training: TrainingSettings, total_steps: int):
    """(AdamW over the trainable parameters, its warmup + cosine LambdaLR)."""
    groups = parameter_groups(model, training.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (was an adapter applied?)")
    optimizer = torch.optim.AdamW(groups, lr=training.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, training.warmup_ratio))
    return optimizer, scheduler


class PlainEngine:
    """Plain torch training: gradient accumulation and clipping by hand.

    Under torch.distributed without DeepSpeed the model is wrapped in DistributedDataParallel, so the
    ranks' gradients are averaged.
    """

    name = "plain"

    def __init__(self, model: torch.nn.Module, training: TrainingSettings, total_steps: int):
        import torch.distributed as dist

        self.optimizer, self.scheduler = build_optimizer(model, training, total_steps)
        if dist.is_available() and dist.is_initialized():
            device = next(model.parameters()).device
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None)
        self.model = model
        self.accumulation = max(1, training.gradient_accumulation_steps)
        self.max_grad_norm = training.max_grad_norm
        self.micro_steps = 0
        self.optimizer_steps = 0
        self.last_grad_norm: float = float("nan")

    def backward(self, loss: torch.Tensor) -> None:
        # Mean over the accumulated micro-batches, as DeepSpeed does.
        (loss / self.accumulation).backward()

    def step(self) -> bool:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return False
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.max_grad_norm and self.max_grad_norm > 0:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return True

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def gathered_params(self) -> contextlib.AbstractContextManager:
        """Context in which the full trainable parameters are readable (for saving)."""
        return contextlib.nullcontext()


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine around the PEFT model, with torch AdamW and the LambdaLR as client objects."""

    @property
    def name(self) -> str:
        return f"deepspeed-zero{self.zero_stage}"

    def __init__(self, model: torch.nn.Module, training: TrainingSettings, engine: EngineSettings,
                 total_steps: int, bf16: bool):
        deepspeed = import_deepspeed()
        optimizer, scheduler = build_optimizer(model, training, total_steps)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self.zero_stage = engine.zero_stage
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(training, engine, bf16), dist_init_required=False)
        self.micro_steps = 0
        self.optimizer_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)   # scales by 1/gradient_accumulation_steps itself

    def step(self) -> bool:
        boundary = self.model.is_gradient_accumulation_boundary()   # must be read before step()
        self.model.step()           # clips, steps optimizer + scheduler at the boundary only
        self.micro_steps += 1
        if boundary:
            self.optimizer_steps += 1
        return boundary

    @property
    def lr(self) -> float:
        return self.model.get_lr()[0]

    def gathered_params(self) -> contextlib.AbstractContextManager:
        """ZeRO-3 partitions every parameter across ranks; gather the trainable ones (all ranks enter)."""
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self._trainable, modifier_rank=None)


def deepspeed_config(training: TrainingSettings, engine: EngineSettings, bf16: bool) -> Dict[str, Any]:
    if engine.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"resources.deepspeed.zero_stage must be 0, 1, 2 or 3, got {engine.zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": max(1, training.gradient_accumulation_steps),
        "gradient_clipping": training.max_grad_norm or 0.0,
        "zero_optimization": {"stage": engine.zero_stage},
        # bf16 only when the base runs in bf16 (a GPU that has it); fp32 elsewhere.
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,   # torch AdamW as the client optimizer
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
    }


def import_deepspeed():
    """deepspeed, set up for this machine; an install hint where it is missing."""
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator once, at first use; name CPU explicitly where there is no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as exc:
        raise ImportError("engine.deepspeed needs deepspeed: pip install 'peft-search[deepspeed]'") from exc
    if not torch.cuda.is_available():
        # The CPU accelerator JIT-compiles a shared-memory all-reduce kernel on first use (over a
        # minute, and a C++ toolchain on every worker); gloo's all-reduce is enough for CPU trials.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def create_engine(model: torch.nn.Module, training: TrainingSettings, engine: EngineSettings,
                  total_steps: int, bf16: bool = False):
    """DeepSpeed under an initialized torch.distributed group when engine.deepspeed, else the plain path."""
    import torch.distributed as dist

    if engine.deepspeed and dist.is_available() and dist.is_initialized():
        return DeepSpeedEngine(model, training, engine, total_steps, bf16)
    return PlainEngine(model, training, total_steps)
