"""Early-stopping schedulers across trials: name -> factory, imported lazily."""
from __future__ import annotations

from typing import Callable, Dict


def _asha(metric: str, mode: str, max_rounds: int, grace_rounds: int, reduction_factor: int):
    from ray.tune.schedulers import ASHAScheduler

    # The time unit is the eval round (one report each, `round` in it: a trial resumed from a checkpoint
    # goes on counting its own rounds); with reduction factor 3 (ASHA's default) roughly one trial in
    # three goes on at every rung.
    return ASHAScheduler(time_attr="round", metric=metric, mode=mode, max_t=max_rounds,
                         grace_period=min(grace_rounds, max_rounds), reduction_factor=reduction_factor)


def _none(metric: str, mode: str, max_rounds: int, grace_rounds: int, reduction_factor: int):
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


SCHEDULERS: Dict[str, Callable] = {"asha": _asha, "none": _none}


def make_scheduler(name: str, metric: str, mode: str, max_rounds: int, grace_rounds: int = 1,
                   reduction_factor: int = 3):
    return SCHEDULERS[name](metric, mode, max_rounds, grace_rounds, reduction_factor)
