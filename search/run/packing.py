"""How many trials each worker group packs (`search.pack`): the spec's K, or with `pack: auto` the K the cost
model (trainers/packing/cost_model.py) chooses from a short probe on a worker's device (trainers/packing/probe.py).

The run directory keeps the decision (packing.json) and each packing group's measured steps per K
(packing/<tune run>-group<N>.json), so `peft-search report` shows both; a resumed search keeps its K.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

from search.store.packing_file import PACKING_FILE, read_json, write_json

log = logging.getLogger("peft_search")


def k_max(spec) -> int:
    """pack: auto's cap: search.pack_max, and no more than a group's share of the trials."""
    return max(1, min(spec.search.pack_max, -(-spec.search.trials // spec.search.concurrency)))


def costliest_settings(spec):
    """One trial's settings at the largest rank, batch size and sequence length the space holds: a pack of
    trials no costlier than these fits what the probe plans for."""
    params = spec.default_params(complete=True)
    for key in ("r", "batch_size", "max_length"):
        kind = spec.space.get(key)
        values = [value for _path, value in kind.extremes() if isinstance(value, (int, float))] if kind else []
        encoded = kind.encode(max(values)) if values else None
        if encoded is not None:   # None: the largest bound is not itself a value of the space (a stepped range)
            params[kind.optuna_name(key)] = encoded
    return spec.trial_settings(params)


def choose_pack(spec, run_dir: str, threads: int, resumed: bool) -> int:
    """K for this search's worker groups; writes packing.json."""
    previous = read_json(os.path.join(run_dir, PACKING_FILE)) if resumed else None
    if spec.search.pack != "auto":
        decision: Dict[str, Any] = {"k": spec.search.pack, "chosen_by": "spec"}
    elif previous and previous.get("chosen_by") == "cost model":
        return int(previous["k"])   # a resumed search keeps the K its trials ran with
    else:
        decision = _probe_on_a_worker(spec, threads)
        log.info(f"search.pack: auto chose K={decision['k']} ({decision['reason']}; probe "
                 f"{decision['probe_s']:.1f} s on {decision['device']})")
    write_json(os.path.join(run_dir, PACKING_FILE), decision)
    return int(decision["k"])


def _probe_on_a_worker(spec, threads: int) -> Dict[str, Any]:
    """The probe as a Ray task with a worker's resources, so it runs on the device the groups train on
    (the driver may have no GPU); max_calls=1: its process, with the base loaded, exits after it."""
    import ray

    resources = spec.resources
    # the part of the device memory this group plans with: its GPU fraction, or on CPU hosts an equal share
    # of the host's memory between the concurrent groups
    share = resources.gpus_per_worker or 1.0 / spec.search.concurrency
    budget, budget_from = None, None
    if resources.memory_budget_gb:
        budget, budget_from = resources.memory_budget_gb * 2 ** 30, "resources.memory_budget_gb"
    elif resources.memory_per_worker_gb and not resources.gpus_per_worker:
        # a pack planned past the host-memory cap would fail every member "out of memory"
        budget, budget_from = resources.memory_per_worker_gb * 2 ** 30, "resources.memory_per_worker_gb"
    task = ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
                      max_calls=1)(probe_decision)
    return ray.get(task.remote(costliest_settings(spec), k_max(spec), budget, share, spec.search.pack_min_gain,
                               threads, budget_from))


def probe_decision(settings, k_max: int, budget_bytes: Optional[float], share: float, min_gain: float,
                   threads: int, budget_from: Optional[str] = None) -> Dict[str, Any]:
    """On a worker: load the base as a group would, probe and choose K (trainers.packing.probe.decide)."""
    import torch

    from trainers.model import load_lent_base
    from trainers.packing.probe import decide

    torch.set_num_threads(threads)
    return decide(load_lent_base(settings), settings, k_max=k_max, budget_bytes=budget_bytes, share=share,
                  min_gain=min_gain, budget_from=budget_from)
