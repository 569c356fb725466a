"""System figures of one trial: throughput, memory, energy, training time, adapter size.

All are measured around the training steps only (not setup, not eval), so trials compare on the
work that differs between configurations.
"""
from __future__ import annotations

import glob
import os
import resource
import time
from typing import Dict, Optional

import torch

from trainers.distributed import all_reduce


def peak_mem_mb(device: torch.device) -> float:
    """CUDA: peak bytes allocated by torch on `device`. CPU: peak RSS of this process (its lifetime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # Linux reports ru_maxrss in KiB. The OS keeps no resettable peak, so in a process that runs
    # several trials this is the highest of them so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def reset_window_peak(device: torch.device, trim: bool = False) -> None:
    """Start a window whose peak memory `window_peak_bytes` reads: CUDA's peak statistics, or on Linux the
    process' peak RSS (VmHWM), which writing 5 to /proc/self/clear_refs resets to the current RSS. (tracemalloc
    sees none of torch's CPU tensors, which come from its own allocator.) `trim` first hands the heap's free
    memory back to the OS (glibc malloc_trim), else memory freed before the window still counts in it; it
    walks the heap, so it is for probes, not for every training step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    if trim:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):   # not glibc: the window then starts above the freed memory
            pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:   # not Linux, or not allowed: the window then starts at the process' start
        pass


def window_peak_bytes(device: torch.device) -> Optional[float]:
    """Peak bytes since `reset_window_peak`: allocated by torch on a CUDA device; on CPU the whole process'
    resident memory (Python, libraries and heap included); None where neither can be read."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024   # kB
    except OSError:
        pass
    return None


def adapter_mb(adapter_dir: str) -> float:
    """Size of the saved adapter weights (*.safetensors) in MiB."""
    files = glob.glob(os.path.join(adapter_dir, "*.safetensors"))
    return sum(os.path.getsize(path) for path in files) / 2 ** 20


class _Nvml:
    """Total energy of this rank's GPU since driver load, in joules (Volta and newer)."""

    def __init__(self, device: torch.device):
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        # NVML numbers GPUs physically; map through CUDA_VISIBLE_DEVICES when it names indices.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        names = [name.strip() for name in visible.split(",") if name.strip()]
        if names and all(name.isdigit() for name in names) and index < len(names):
            index = int(names[index])
        self._pynvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.read()  # fails here, not mid-training, where the GPU has no energy counter

    def read(self) -> float:
        return self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0  # mJ -> J


class _Rapl:
    """Energy of the CPU packages from Intel RAPL (/sys/class/powercap), in joules; wraps are handled."""

    def __init__(self):
        self._zones = [path for path in glob.glob("/sys/class/powercap/intel-rapl:*")
                       if path.count(":") == 1]      # packages only: their sub-zones are included in them
        if not self._zones:
            raise OSError("no RAPL zones")
        self._ranges = [self._read_int(os.path.join(zone, "max_energy_range_uj")) for zone in self._zones]
        self._last = [self._read_int(os.path.join(zone, "energy_uj")) for zone in self._zones]
        self._total_uj = 0

    @staticmethod
    def _read_int(path: str) -> int:
        with open(path) as handle:
            return int(handle.read().strip())

    def read(self) -> float:
        for i, zone in enumerate(self._zones):
            now = self._read_int(os.path.join(zone, "energy_uj"))
            delta = now - self._last[i]
            self._total_uj += delta if delta >= 0 else delta + self._ranges[i]
            self._last[i] = now
        return self._total_uj / 1e6


def energy_counter(device: torch.device):
    """An object whose read() gives cumulative joules: NVML on a GPU, RAPL on a CPU; None if neither works."""
    if device.type == "cuda":
        try:
            return _Nvml(device)
        except Exception:  # no pynvml, old GPU, or no permission: the figure is then unknown, not an error
            return None
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None  # RAPL measures the whole CPU package: count it once per machine
    try:
        return _Rapl()
    except (OSError, ValueError):  # missing, or unreadable (root-only on recent kernels)
        return None


class TrainMeter:
    """Accumulates training-only seconds, non-pad tokens and energy across training segments."""

    def __init__(self, device: torch.device):
        self.device = device
        self.train_s = 0.0
        self.tokens = 0
        self.energy_j: Optional[float] = 0.0
        self._counter = energy_counter(device)
        # CPU ranks other than a machine's first measure nothing on purpose (RAPL is per machine)
        counts_energy = device.type == "cuda" or int(os.environ.get("LOCAL_RANK", "0")) == 0
        self._energy_missing = counts_energy and self._counter is None
        if self._counter is None:
            self.energy_j = None
        self._started: Optional[float] = None
        self._energy_start = 0.0
        reset_peak_mem(device)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # do not bill queued work from before to training
        if self._counter is not None:
            self._energy_start = self._counter.read()
        self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # wait for the kernels the steps queued
        self.train_s += time.perf_counter() - self._started
        self._started = None
        if self._counter is not None:
            self.energy_j += self._counter.read() - self._energy_start

    def figures(self) -> Dict[str, Optional[float]]:
        """tokens_per_s, peak_mem_mb, train_s, energy_j over all ranks (identical on every rank).

        Tokens and energy add up over ranks; time and memory are the slowest / largest rank's.
        energy_j is None if any rank cannot measure it (a partial sum would mislead).
        """
        tokens, energy, missing = all_reduce([self.tokens, self.energy_j or 0.0, float(self._energy_missing)],
                                             op="sum")
        train_s, peak = all_reduce([self.train_s, peak_mem_mb(self.device)], op="max")
        return {
            "tokens_per_s": tokens / train_s if train_s > 0 else 0.0,
            "peak_mem_mb": peak,
            "train_s": train_s,
            "energy_j": None if missing else energy,
        }


def count_trainable(model: torch.nn.Module) -> int:
    """Trainable parameters (count before DeepSpeed: ZeRO-3 leaves 0-size shards on the module)."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)
