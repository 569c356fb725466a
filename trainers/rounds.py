"""What a trial's rounds are, shared by the recipe (trainers/recipe.py, one trial) and the pack
(trainers/packing/pack.py, several trials on one base): the plan of optimizer steps and eval rounds, plateau
stopping, the divergence check on the training loss, a round's report, the eval loop and metrics.json.
A packed trial's reports must be its solo run's, so both take them from here."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

from trainers.metrics import EvalCounts
from trainers.settings import TrialSettings

METRICS_FILE = "metrics.json"
# A loss this many times the first one (or 1.0 if that was smaller) counts as diverged although still
# finite: gradient clipping keeps a far too large learning rate from reaching inf/nan, and the loss
# explodes instead (1e9 for a classifier that started at 0.69). Healthy training never comes near it.
DIVERGENCE_FACTOR = 100.0


@dataclass
class Plan:
    """How many optimizer steps, and after which ones an eval round (a report) comes."""
    batches_per_epoch: int
    total_steps: int
    round_ends: List[int]

    @classmethod
    def for_trial(cls, settings: TrialSettings, batches_per_epoch: int) -> "Plan":
        training = settings.training
        if training.epochs < 1 or training.evals_per_epoch < 1:
            raise ValueError(f"training.epochs and training.evals_per_epoch must be >= 1, "
                             f"got {training.epochs} and {training.evals_per_epoch}")
        accumulation = max(1, training.gradient_accumulation_steps)
        total = math.ceil(training.epochs * batches_per_epoch / accumulation)
        if training.max_steps is not None:
            total = min(total, training.max_steps)
        if total < 1:
            raise ValueError(f"training.max_steps must be >= 1, got {training.max_steps}")
        # A round needs at least one step; with fewer steps than rounds there are fewer rounds.
        rounds = min(training.epochs * training.evals_per_epoch, total)
        return cls(batches_per_epoch, total, [math.ceil(k * total / rounds) for k in range(1, rounds + 1)])


@dataclass
class Plateau:
    """Plateau stopping: the watched metric has not improved by more than `min_delta` for `patience`
    eval rounds in a row. Fed the reduced metrics, so every rank decides the same at the same round."""
    metric: str
    mode: str                            # min | max
    patience: Optional[int]              # None: never stops
    min_delta: float = 0.0
    best: Optional[float] = None
    stale_rounds: int = 0                # rounds since the last improvement

    @classmethod
    def for_trial(cls, settings: TrialSettings) -> "Plateau":
        training = settings.training
        if training.early_stopping_patience is not None and training.early_stopping_patience < 1:
            raise ValueError(f"training.early_stopping_patience must be >= 1 or None, "
                             f"got {training.early_stopping_patience}")
        if training.early_stopping_min_delta < 0:
            raise ValueError(f"training.early_stopping_min_delta must be >= 0, got {training.early_stopping_min_delta}")
        if training.monitor_mode not in ("min", "max"):
            raise ValueError(f"training.monitor_mode must be min or max, got {training.monitor_mode!r}")
        return cls(training.monitor, training.monitor_mode, training.early_stopping_patience,
                   training.early_stopping_min_delta)

    def stalled(self, metrics: Dict[str, Any]) -> bool:
        """Take one round's metrics; True when the trial should stop here."""
        if self.patience is None:
            return False
        if self.metric not in metrics:
            raise ValueError(f"training.monitor: {self.metric!r} is not among this trial's metrics "
                             f"({', '.join(sorted(key for key in metrics if key.startswith('eval_')))})")
        value = float(metrics[self.metric])
        if self.best is None:
            gain = math.inf
        else:
            gain = value - self.best if self.mode == "max" else self.best - value
        if math.isfinite(value) and gain > self.min_delta:   # a nan never counts as an improvement
            self.best, self.stale_rounds = value, 0
        else:
            self.stale_rounds += 1
        return self.stale_rounds >= self.patience

    def reason(self, number: int, rounds: int) -> str:
        return (f"plateau: {self.metric} did not improve by > {self.min_delta:g} for {self.stale_rounds} rounds "
                f"(stopped after round {number} of {rounds})")


@dataclass
class Losses:
    """A trial's training losses: the first (the reference for divergence) and those of the current round."""
    first: Optional[float] = None
    this_round: List[float] = field(default_factory=list)

    def add(self, loss: float, step: int) -> Optional[str]:
        """Record step `step`'s loss; the reason where it diverged (NaN/inf, or DIVERGENCE_FACTOR x the first),
        in which case it is not recorded."""
        if self.first is None:
            self.first = loss
        if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * max(self.first, 1.0):
            return f"diverged at step {step} (loss={loss:.4g})"
        self.this_round.append(loss)
        return None

    def take_round_mean(self) -> float:
        losses, self.this_round = self.this_round, []
        return sum(losses) / len(losses) if losses else float("nan")


def round_report(number: int, plan: Plan, optimizer_steps: int, micro_batches: int, losses: Losses) -> Dict[str, Any]:
    """Where a trial stands after round `number`: the start of its report."""
    return {
        "round": number,
        "rounds_total": len(plan.round_ends),   # a report before the last one means stopped early
        "step": optimizer_steps,
        "epoch": micro_batches / plan.batches_per_epoch,
        "train_loss": losses.take_round_mean(),
    }


def stop_on_plateau(plateau: Plateau, metrics: Dict[str, Any], number: int, rounds: int) -> bool:
    """Whether the trial stops after round `number` of `rounds` on a plateau; if so its report says so (its
    own round as `rounds_total`: a finished trial, not a pruned one, and why in `stopped_early`)."""
    stopped = plateau.stalled(metrics) and number < rounds
    if stopped:
        metrics.update(rounds_total=number, stopped_early=plateau.reason(number, rounds))
    return stopped


def eval_metrics(model, batches: Iterable[Dict[str, Any]], task: str, num_labels: Optional[int],
                 logits_of: Callable[[Dict[str, Any]], Any]) -> Dict[str, float]:
    """The eval metrics over `batches` (this rank's share), reduced over ranks; `logits_of(batch)` runs the
    forward. The model is in eval mode (dropout off) for the loop only."""
    model.eval()
    counts = EvalCounts(task, num_labels)
    try:
        for batch in batches:
            counts.add(logits_of(batch), batch)
    finally:
        model.train()
    return counts.reduced().metrics()


def write_metrics(output_dir: str, metrics: Dict[str, Any], engine: str, world_size: int) -> None:
    with open(os.path.join(output_dir, METRICS_FILE), "w", encoding="utf-8") as handle:
        json.dump({**metrics, "engine": engine, "world_size": world_size}, handle, indent=2)
