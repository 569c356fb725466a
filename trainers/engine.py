"""Optimizer steps for one trial: a plain torch path and a DeepSpeed ZeRO path, one interface.

Both paths use the same client optimizer (torch AdamW, or bitsandbytes' paged 8-bit AdamW) and the same
warmup + cosine LambdaLR, so a trial's result does not depend on which path ran it (DeepSpeed's fused/CPU
Adam would need compiled ops on every worker).
The recipe calls, per micro-batch: `outputs = engine.model(**batch)`, `engine.backward(loss)`,
`engine.step()`; `step()` returns True when an optimizer step happened (every
gradient_accumulation_steps micro-batches). `save_state` / `load_state` checkpoint the trained weights
and the optimizer and schedule state (every rank calls them).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Dict, List, Optional

import torch

from trainers.deepspeed_config import deepspeed_config, import_deepspeed, precision_of
from trainers.settings import OPTIMIZERS, EngineSettings, TrainingSettings, TrialSettings

# Parameters that get no weight decay: decaying a bias or a norm's gain has no regularising
# meaning, and IA3 / DoRA scaling vectors would be pulled towards 0 (switching features off).
_NO_DECAY_MARKERS = ("bias", "norm", "ia3_l", "lora_magnitude_vector")
ADAPTER_FILE = "adapter.safetensors"      # the trained parameters, by name (plain engine)
OPTIMIZER_FILE = "optimizer.pt"           # optimizer, schedule and loss-scaler state (plain engine)
DEEPSPEED_TAG = "engine"                  # DeepSpeed's checkpoint folder inside a round's checkpoint


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


def optimizer_class(name: str):
    """torch AdamW, or bitsandbytes' PagedAdamW8bit: 8-bit state (a quarter of AdamW's), paged to CPU memory
    when the GPU runs short (QLoRA's optimizer). Paging is CUDA unified memory, so it needs a GPU."""
    if name == "adamw":
        return torch.optim.AdamW
    if name != "paged_adamw_8bit":
        raise ValueError(f"training.optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError("training.optimizer: paged_adamw_8bit pages its state through CUDA unified memory and "
                         "needs a CUDA GPU; use adamw on CPU")
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError("training.optimizer=paged_adamw_8bit needs bitsandbytes: "
                          "pip install 'peft-search[quantization]'") from exc
    return bitsandbytes.optim.PagedAdamW8bit


def build_optimizer(model: torch.nn.Module, training: TrainingSettings, total_steps: int):
    """(the client optimizer over the trainable parameters, its warmup + cosine LambdaLR)."""
    groups = parameter_groups(model, training.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (was an adapter applied?)")
    optimizer = optimizer_class(training.optimizer)(groups, lr=training.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, training.warmup_ratio))
    return optimizer, scheduler


class PlainEngine:
    """Plain torch training: gradient accumulation, clipping and (fp16) loss scaling by hand.

    Under torch.distributed without DeepSpeed the model is wrapped in DistributedDataParallel, so the
    ranks' gradients are averaged.
    """

    name = "plain"

    def __init__(self, model: torch.nn.Module, training: TrainingSettings, total_steps: int,
                 precision: str = "fp32"):
        import torch.distributed as dist

        self.optimizer, self.scheduler = build_optimizer(model, training, total_steps)
        self.module = model                   # unwrapped: checkpoints name parameters as the PEFT model does
        device = next(model.parameters()).device
        if dist.is_available() and dist.is_initialized():
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None)
        self.model = model
        # fp16 activations' gradients underflow without loss scaling; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.accumulation = max(1, training.gradient_accumulation_steps)
        self.max_grad_norm = training.max_grad_norm
        self.micro_steps = 0
        self.optimizer_steps = 0
        self.last_grad_norm: Optional[torch.Tensor] = None

    def backward(self, loss: torch.Tensor) -> None:
        self.backward_term(loss).backward()

    def backward_term(self, loss: torch.Tensor) -> torch.Tensor:
        """What `backward` differentiates: the loss over the accumulated micro-batches (their mean, as
        DeepSpeed takes), loss-scaled under fp16. Packed trials (trainers/packing/pack.py) add their members'
        terms and differentiate the sum once; each member's parameters get only its own term's gradient."""
        loss = loss / self.accumulation
        return self.scaler.scale(loss) if self.scaler else loss

    def step(self) -> bool:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)   # clip the true gradients
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.max_grad_norm and self.max_grad_norm > 0:
            # kept as a tensor on the device: reading it here would wait for the GPU every step
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        stepped = True
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)       # skips a step whose gradients overflowed...
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale   # ...and lowers the scale; DeepSpeed's fp16 does the same
        else:
            self.optimizer.step()
        if stepped:                                # the schedule waits for a real step, as in DeepSpeed
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

    def save_state(self, directory: str, is_main: bool) -> None:
        """Rank 0 writes the trained parameters (safetensors) and the optimizer state (every rank holds the same)."""
        if not is_main:
            return
        from safetensors.torch import save_file

        trained = {name: param.detach().cpu().contiguous() for name, param in self.module.named_parameters()
                   if param.requires_grad}
        save_file(trained, os.path.join(directory, ADAPTER_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None},
                   os.path.join(directory, OPTIMIZER_FILE))

    def load_state(self, directory: str) -> None:
        from safetensors.torch import load_file

        trained = load_file(os.path.join(directory, ADAPTER_FILE))
        params = {name: param for name, param in self.module.named_parameters() if param.requires_grad}
        if set(trained) != set(params):
            raise ValueError(f"{directory}: the checkpoint's trained parameters do not match this trial's adapter "
                             f"({len(trained)} saved, {len(params)} here); resume with the settings it was saved with")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(trained[name])
        # weights_only: a checkpoint file cannot run code when it is read
        state = torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine around the PEFT model, with the client optimizer and LambdaLR."""

    @property
    def name(self) -> str:
        return f"deepspeed-zero{self.zero_stage}"

    def __init__(self, model: torch.nn.Module, training: TrainingSettings, engine: EngineSettings,
                 total_steps: int, precision: str = "fp32"):
        import torch.distributed as dist

        deepspeed = import_deepspeed()
        self.config = deepspeed_config(training, engine, precision, dist.get_world_size())
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        if engine.zero_stage == 3 and precision != "fp32":
            # ZeRO-3 flattens the trainable parameters into one buffer of one dtype, but PEFT keeps the
            # adapter in fp32 beside a bf16 classification head (seen on an H100). DeepSpeed keeps fp32
            # master copies of half-precision parameters itself, so nothing is lost by casting them.
            half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            for param in self._trainable:
                param.data = param.data.to(half)
        optimizer, scheduler = build_optimizer(model, training, total_steps)
        self.zero_stage = engine.zero_stage
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config, dist_init_required=False)
        self.micro_steps = 0
        self.optimizer_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)   # scales by 1/gradient_accumulation_steps (and the fp16 loss scale) itself

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

    def save_state(self, directory: str, is_main: bool) -> None:
        """DeepSpeed's checkpoint: every rank writes its ZeRO partition; the frozen base is left out."""
        self.model.save_checkpoint(directory, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_state(self, directory: str) -> None:
        # DeepSpeed's checkpoint engine reads its files with torch.load(weights_only=False), which runs whatever
        # code a planted file holds; this engine's reads go through the weights-only loader instead.
        self.model.checkpoint_engine.load = weights_only_load
        # not strict: the checkpoint holds the trained parameters only, the base comes from its own files
        path, _ = self.model.load_checkpoint(directory, tag=DEEPSPEED_TAG, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint ({DEEPSPEED_TAG}/)")


def weights_only_load(path: str, map_location: Any = None) -> Any:
    """torch.load(weights_only=True) that also accepts the few DeepSpeed classes its checkpoints hold.

    ZeRO optimizer states pickle a ZeroStageEnum, the loss scaler and, at stage 1/2, fragment addresses: plain
    values, rebuilt without running code, so allowing them keeps a checkpoint from executing anything on load."""
    with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _deepspeed_checkpoint_classes() -> List[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def uses_deepspeed(engine: EngineSettings) -> bool:
    """DeepSpeed runs where it is asked for and a torch.distributed group exists (Ray Train, torchrun)."""
    import torch.distributed as dist

    return engine.deepspeed and dist.is_available() and dist.is_initialized()


def zero3_load_config(settings: TrialSettings, device: torch.device) -> Optional[Dict[str, Any]]:
    """The DeepSpeed config a ZeRO-3 trial loads its base under (trainers/model.py), else None."""
    import torch.distributed as dist

    from trainers.model import compute_dtype

    if not uses_deepspeed(settings.engine) or settings.engine.zero_stage != 3:
        return None
    precision = precision_of(str(compute_dtype(settings.model.dtype, device)))
    return deepspeed_config(settings.training, settings.engine, precision, dist.get_world_size())


def create_engine(model: torch.nn.Module, training: TrainingSettings, engine: EngineSettings,
                  total_steps: int, precision: str = "fp32"):
    """DeepSpeed under an initialized torch.distributed group when engine.deepspeed, else the plain path.

    `precision`: bf16 | fp16 | fp32, the base model's dtype (trainers/deepspeed_config.precision_of)."""
    if uses_deepspeed(engine):
        return DeepSpeedEngine(model, training, engine, total_steps, precision)
    return PlainEngine(model, training, total_steps, precision)
