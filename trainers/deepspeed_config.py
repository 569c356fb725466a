"""The DeepSpeed configuration of a trial: generated from its settings, with the user's own JSON merged under it.

The generated part decides what the spec decides: ZeRO stage and offload, precision, micro-batch size,
accumulation, clipping. A user's JSON (`resources.deepspeed.config`) adds anything else DeepSpeed reads
(bucket sizes, overlap_comm, activation checkpointing, ...). A key that both decide must agree, so that the
spec stays the one place a setting is read from (a search over training.batch_size cannot be undone by a
JSON file); "auto", the placeholder of HF's DeepSpeed integration, means "the spec's value".

No torch import at module level: the search validates a spec with this module.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Dict, List, Mapping, Optional

from trainers.settings import OFFLOAD_DEVICES, EngineSettings, TrainingSettings

PRECISIONS = ("bf16", "fp16", "fp32")
AUTO = "auto"
WHERE = "resources.deepspeed.config"
# Generated key (dotted path) -> the spec key that decides it, formatted with the generated value.
SPEC_KEYS = {
    "train_batch_size": "training.batch_size x training.gradient_accumulation_steps x workers ({})",
    "train_micro_batch_size_per_gpu": "training.batch_size={}",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps={}",
    "gradient_clipping": "training.max_grad_norm={}",
    "zero_optimization.stage": "resources.deepspeed.zero_stage={}",
    "zero_optimization.offload_optimizer.device": "resources.deepspeed.offload_optimizer={}",
    "zero_optimization.offload_param.device": "resources.deepspeed.offload_param={}",
    "bf16.enabled": "model.dtype (bf16.enabled={})",
    "fp16.enabled": "model.dtype (fp16.enabled={})",
}
# Sections a user's JSON may not bring: the trial hands DeepSpeed its own optimizer and warmup + cosine
# schedule (the same as on the plain path, so a result does not depend on the engine).
CLIENT_OWNED = {"optimizer": "training.optimizer", "scheduler": "training.learning_rate / training.warmup_ratio"}
_MISSING = object()


class DeepSpeedConfigError(ValueError):
    """A user's DeepSpeed JSON that contradicts the settings; one line per problem, each naming both keys."""

    def __init__(self, problems: List[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def read_user_config(path: str) -> Dict[str, Any]:
    """The JSON object in `path`; DeepSpeedConfigError naming the key and the file otherwise."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except OSError as exc:
        raise DeepSpeedConfigError([f"{WHERE}: cannot read {path} ({exc.strerror or exc})"]) from None
    except ValueError as exc:
        raise DeepSpeedConfigError([f"{WHERE}: {path} is not valid JSON: {exc}"]) from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError([f"{WHERE}: {path} must hold a JSON object of DeepSpeed keys, "
                                    f"got {type(config).__name__}"])
    return config


def precision_of(dtype_name: str) -> str:
    """bf16 | fp16 | fp32 for a torch dtype's name ("bfloat16", "torch.float16", ...)."""
    name = str(dtype_name).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[name]


def generated_config(training: TrainingSettings, engine: EngineSettings, precision: Optional[str],
                     world_size: int) -> Dict[str, Any]:
    """The config the settings decide. `precision` None: not known yet (validating for unknown GPUs)."""
    if engine.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"resources.deepspeed.zero_stage must be 0, 1, 2 or 3, got {engine.zero_stage}")
    for key in ("offload_optimizer", "offload_param"):
        if getattr(engine, key) not in OFFLOAD_DEVICES:
            raise ValueError(f"resources.deepspeed.{key} must be one of {list(OFFLOAD_DEVICES)}, "
                             f"got {getattr(engine, key)!r}")
    if engine.offload_param != "none" and engine.zero_stage != 3:
        raise ValueError(f"resources.deepspeed.offload_param needs zero_stage 3 (the only stage that partitions "
                         f"the weights), got zero_stage={engine.zero_stage}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    accumulation = max(1, training.gradient_accumulation_steps)
    config: Dict[str, Any] = {
        "train_batch_size": training.batch_size * accumulation * world_size,
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": training.max_grad_norm or 0.0,
        "zero_optimization": {"stage": engine.zero_stage,
                              "offload_optimizer": {"device": engine.offload_optimizer},
                              "offload_param": {"device": engine.offload_param}},
        "zero_allow_untested_optimizer": True,   # torch AdamW / bitsandbytes as the client optimizer
        # Offloaded, torch AdamW steps on the CPU: slower than DeepSpeedCPUAdam, which needs compiled ops
        # (a C++ toolchain on every worker).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
    }
    if precision is not None:
        # fp16 gets DeepSpeed's dynamic loss scaling (its default); bf16 needs none.
        config["bf16"] = {"enabled": precision == "bf16"}
        config["fp16"] = {"enabled": precision == "fp16"}
    return config


def conflicts(user: Mapping[str, Any], generated: Mapping[str, Any]) -> List[str]:
    """Where the user's JSON contradicts the generated config, each line naming both keys."""
    problems = [f"{WHERE}: {key} conflicts with {spec_key}: the trial passes its own optimizer and schedule "
                f"to DeepSpeed; remove {key!r} from the file" for key, spec_key in CLIENT_OWNED.items() if key in user]
    for path, spec_key in SPEC_KEYS.items():
        theirs, ours = _get(user, path), _get(generated, path)
        if theirs is _MISSING or ours is _MISSING or theirs == AUTO or theirs == ours:
            continue
        problems.append(f"{WHERE}: {path}={theirs!r} conflicts with {spec_key.format(ours)}")
    unfilled = [path for path in _auto_paths(user) if path not in SPEC_KEYS and _get(generated, path) is _MISSING]
    problems += [f"{WHERE}: {path}='auto' has no value here (only the HF Trainer fills it); give a value or "
                 f"remove it" for path in unfilled]
    return problems


def merged_config(user: Mapping[str, Any], generated: Mapping[str, Any]) -> Dict[str, Any]:
    """The user's JSON with the generated keys laid over it; DeepSpeedConfigError on a conflict."""
    problems = conflicts(user, generated)
    if problems:
        raise DeepSpeedConfigError(problems)
    merged = copy.deepcopy(dict(user))
    _overlay(merged, generated)
    return merged


def deepspeed_config(training: TrainingSettings, engine: EngineSettings, precision: str,
                     world_size: int) -> Dict[str, Any]:
    """The config a trial's DeepSpeed engine runs with (written to the trial's deepspeed.json)."""
    return merged_config(engine.user_config, generated_config(training, engine, precision, world_size))


def _get(config: Mapping[str, Any], path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _auto_paths(config: Mapping[str, Any], prefix: str = "") -> List[str]:
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            paths += _auto_paths(value, path + ".")
        elif value == AUTO:
            paths.append(path)
    return paths


def _overlay(target: Dict[str, Any], top: Mapping[str, Any]) -> None:
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), Mapping):
            target[key] = dict(target[key])
            _overlay(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def import_deepspeed():
    """deepspeed, set up for this machine; an install hint where it is missing."""
    import os

    import torch

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
