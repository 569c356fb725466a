"""Calibrate the pack cost model (trainers/packing/cost_model.py) on the real base and device, choose K, and measure
the packed steps a worker group really runs.

The probe trains a few packed steps of one trial's settings (the search's costliest: largest rank, batch
and length) at three points: K=1 at half the rows, K=1 and K=2 (the first separates per-member costs from
per-token ones). Rows are synthetic and exactly `data.max_length` tokens wide, the widest a real batch
can be, so the prediction is an upper bound for memory. Each point: `warmup` steps, then `steps` timed
steps; peak memory is CUDA's max_memory_allocated on a GPU and the process' peak RSS on CPU
(trainers/system.window_peak_bytes).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, replace
from typing import Any, Dict, Optional

import torch

from trainers.data import CAUSAL_LM, TOKEN_CLASSIFICATION
from trainers.kernels import wants_checkpointing
from trainers.model import LoadedBase
from trainers.packing.cost_model import K_MAX, MIN_GAIN, BaseShape, CostModel, Measurement, MemberShape, choose_k
from trainers.packing.pack import Pack
from trainers.settings import TrialSettings
from trainers.system import reset_window_peak, window_peak_bytes

# Share of the measured free memory a pack may plan to use: allocator fragmentation, eval batches and the
# prediction's own error need the rest.
SAFETY = 0.85


def base_shape(base: LoadedBase) -> BaseShape:
    """The loaded base's shape. Linear layers (nn.Linear, bitsandbytes' Linear4bit / Linear8bitLt, GPT-2's
    Conv1D) are counted by in x out, the logical size, whatever their packed storage holds."""
    model, config = base.model, base.model.config
    matmul = quantized = 0
    linear_weights = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        fan = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if None in fan:
            fan = (getattr(module, "nx", None), getattr(module, "nf", None))   # GPT-2 Conv1D
        if not isinstance(weight, torch.Tensor) or None in fan or id(weight) in linear_weights:
            continue
        linear_weights.add(id(weight))
        matmul += fan[0] * fan[1]
        if not weight.is_floating_point():   # stored quantized
            quantized += fan[0] * fan[1]
    others = sum(param.numel() for param in model.parameters() if id(param) not in linear_weights)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    return BaseShape(params=matmul + others, matmul_params=matmul, quantized_params=quantized, hidden=hidden,
                     layers=layers, logit_width=text.vocab_size if base.task == CAUSAL_LM else 0,
                     quantization=base.quantization, dtype_bytes=torch.finfo(base.dtype).bits // 8,
                     checkpointing=base.settings is not None and wants_checkpointing(base.settings))


def _probe_settings(settings: TrialSettings, rows: int, seed: int) -> TrialSettings:
    """The trial's settings for probing: its rows, a tiny learning rate (random rows must not diverge) and no
    round end within the probe's steps (a member at a round end stops until evaluated)."""
    training = replace(settings.training, batch_size=rows, seed=seed, learning_rate=1e-6, epochs=10_000,
                       evals_per_epoch=1, max_steps=None, early_stopping_patience=None)
    return replace(settings, training=training)


def _synthetic_rows(base: LoadedBase, rows: int, seq: int, seed: int):
    """An endless stream of one batch of full-width random rows, as trainers.data.batch_stream yields them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, base.model.config.vocab_size, (rows, seq), generator=generator)
    if base.task == CAUSAL_LM:
        labels = ids.clone()
    elif base.task == TOKEN_CLASSIFICATION:   # a tag per position
        labels = torch.zeros_like(ids)
    else:
        labels = torch.zeros(rows, dtype=torch.long)
    return itertools.repeat((0, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_pack(base: LoadedBase, settings: TrialSettings, k: int, rows: int, steps: int,
                 warmup: int) -> Measurement:
    """Peak memory and seconds per step of K copies of `settings` at `rows` rows of data.max_length tokens."""
    device, seq = base.device, settings.data.max_length
    with Pack(base) as pack:
        for index in range(k):
            member = pack.add(index, _probe_settings(settings, rows, seed=index))
            member.stream = _synthetic_rows(base, rows, seq, seed=index)
        for _ in range(warmup):
            pack.step()
        _sync(device)
        reset_window_peak(device, trim=True)
        started = time.perf_counter()
        for _ in range(steps):
            failed = pack.step().failed
            if failed:
                raise RuntimeError(f"probe members failed: {failed}")
        _sync(device)
        seconds = (time.perf_counter() - started) / steps
        peak = window_peak_bytes(device)
        shape = MemberShape(rows, seq, member.trainable_params, settings.training.optimizer)
    return Measurement((shape,) * k, peak, seconds)


def probe(base: LoadedBase, settings: TrialSettings, steps: int = 3, warmup: int = 1):
    """(fitted CostModel, the measurements it was fitted to, the member shape of `settings`)."""
    rows = settings.training.batch_size
    # In ascending memory: on CPU, heap memory that glibc does not hand back (malloc_trim aside) would make a
    # smaller point after a larger one read the larger one's peak.
    points = ([(1, rows // 2)] if rows > 1 else []) + [(1, rows), (2, rows)]
    measurements = [measure_pack(base, settings, k, r, steps, warmup) for k, r in points]
    model = CostModel(base_shape(base)).fitted(measurements)
    return model, measurements, measurements[-1].members[0]


def memory_budget(device: torch.device, share: float = 1.0) -> float:
    """Bytes a pack may plan to use: the device's free memory plus what this process holds already (CUDA:
    torch's reserved pool; CPU: its resident memory, which the CPU prediction includes), times `share` (the
    part of the device this group owns) and SAFETY."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device)
    else:
        import psutil

        usable = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    return usable * min(share, 1.0) * SAFETY


def decide(base: LoadedBase, settings: TrialSettings, k_max: int = K_MAX, budget_bytes: Optional[float] = None,
           share: float = 1.0, min_gain: float = MIN_GAIN, steps: int = 3, warmup: int = 1,
           budget_from: Optional[str] = None) -> Dict[str, Any]:
    """Probe, fit and choose K: the record that the run directory keeps as packing.json. `budget_from` names
    the spec key a given `budget_bytes` came from."""
    started = time.perf_counter()
    model, measurements, member = probe(base, settings, steps, warmup)
    budget_given = budget_bytes is not None
    if budget_bytes is None:
        budget_bytes = memory_budget(base.device, share)
    choice = choose_k(model, member, budget_bytes, k_max, min_gain)
    return {
        "k": choice.k, "chosen_by": "cost model", "reason": choice.reason, "k_max": k_max, "min_gain": min_gain,
        "budget_bytes": budget_bytes,
        "budget_from": (budget_from or "resources.memory_budget_gb") if budget_given else
        f"{'free device' if base.device.type == 'cuda' else 'available host'} memory x {min(share, 1.0):.3g} "
        f"(this group's share) x {SAFETY}",
        "device": _device_name(base.device), "member": asdict(member), **model.to_dict(),
        "probe": [{"k": len(m.members), "rows": m.members[0].rows, "seq": m.members[0].seq,
                   "peak_bytes": m.peak_bytes, "step_s": m.step_s,
                   "predicted_bytes": model.memory_bytes(m.members), "predicted_step_s": model.step_s(m.members)}
                  for m in measurements],
        "probe_steps": steps, "probe_s": time.perf_counter() - started, "predicted": choice.rows,
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class StepMeter:
    """Per pack size K: steps, seconds, token positions and peak memory of the packed steps a worker group
    really trains (search/pool.serve_packed), to set beside the prediction. On a GPU a step's time is read at
    the host sync every step ends with (its losses), so the optimizer kernels a step queues are billed to
    the next: right on average over many steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.by_k: Dict[int, Dict[str, float]] = {}

    def step(self, pack: Pack):
        reset_window_peak(self.device)
        started = time.perf_counter()
        result = pack.step()
        seconds = time.perf_counter() - started
        if result.members:
            entry = self.by_k.setdefault(result.members, {"steps": 0, "seconds": 0.0, "positions": 0,
                                                          "max_positions": 0, "peak_bytes": None})
            entry["steps"] += 1
            entry["seconds"] += seconds
            entry["positions"] += result.positions
            entry["max_positions"] = max(entry["max_positions"], result.positions)
            peak = window_peak_bytes(self.device)
            if peak is not None:
                entry["peak_bytes"] = max(entry["peak_bytes"] or 0.0, peak)
        return result

    def to_dict(self) -> Dict[str, Any]:
        return {"device": _device_name(self.device), "by_k": {str(k): dict(v) for k, v in sorted(self.by_k.items())}}
