"""Optuna behind Ray Tune, with trial states and results that the run directory can trust.

Ray's `OptunaSearch` marks an errored trial that reported anything as COMPLETE and an
early-stopped one as COMPLETE with its intermediate value. Here a trial stopped before its last
eval round is PRUNED, an errored one is FAIL with its reason, and every finished trial carries its
metrics and system figures as Optuna user attributes, so the Optuna storage alone is enough to
rebuild trials.csv and the report (also while the search runs, also after the driver died).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.results import SYSTEM_COLUMNS

# The key under which the searcher passes the Optuna trial number to the trial function.
TRIAL_NUMBER_KEY = "__optuna_trial_number"
FAIL_REASON_KEY = "fail_reason"
ROUNDS_TOTAL_KEY = "rounds_total"
# Figures stored on each Optuna trial besides its metrics: trials.csv's system columns and bookkeeping.
SYSTEM_KEYS = (*SYSTEM_COLUMNS, "trainable_params", ROUNDS_TOTAL_KEY)


def _sampler_tpe(seed: int) -> optuna.samplers.BaseSampler:
    # multivariate + group: rank/alpha/lr interact, and PEFT spaces are small enough for it
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=4)


def _sampler_random(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _sampler_nsga2(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed)


# name -> factory(seed); grid needs the space, so the driver builds it through `make_sampler`.
SAMPLERS: Dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": _sampler_tpe,
    "random": _sampler_random,
    "nsga2": _sampler_nsga2,
}


def make_sampler(algorithm: str, seed: int, grid: Optional[Dict[str, list]] = None) -> optuna.samplers.BaseSampler:
    if algorithm == "grid":
        return optuna.samplers.GridSampler(grid or {}, seed=seed)
    return SAMPLERS[algorithm](seed)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class PeftOptunaSearch(OptunaSearch):
    """OptunaSearch with correct PRUNED / FAIL states and results stored on the Optuna trial."""

    def __init__(self, *args, decode: Callable[[dict], dict], **kwargs):
        super().__init__(*args, **kwargs)
        self._decode = decode
        self._last_results: Dict[str, dict] = {}

    def suggest(self, trial_id: str) -> Optional[Dict]:
        params = super().suggest(trial_id)
        if params is None:
            return None
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("tune_trial_id", trial_id)
        for name, value in self._decode(dict(ot_trial.params)).items():
            ot_trial.set_user_attr(f"param_{name}", value)
        return {**params, TRIAL_NUMBER_KEY: ot_trial.number}

    def on_trial_result(self, trial_id: str, result: Dict):
        self._last_results[trial_id] = result
        metric = result.get(self.metric) if isinstance(self.metric, str) else None
        if _finite_number(metric):  # a failure report carries no metric
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        last = result or self._last_results.pop(trial_id, None) or {}
        for key, value in last.items():
            if key.startswith(("eval_", "train_")) or key in SYSTEM_KEYS or key in ("round", "step", "epoch"):
                if value is None or _finite_number(value):
                    ot_trial.set_user_attr(key, value)
        state, values = self._final_state(last, error)
        if state == TrialState.FAIL:
            reason = last.get(FAIL_REASON_KEY) or "the trial process failed (see the Ray trial logs)"
            ot_trial.set_user_attr(FAIL_REASON_KEY, str(reason))
        elif state == TrialState.PRUNED:
            ot_trial.set_user_attr(FAIL_REASON_KEY, f"stopped by the scheduler after round {last.get('round')}")
        self._ot_study.tell(ot_trial, values if state == TrialState.COMPLETE else None, state=state)
        self._completed_trials.add(trial_id)

    def _final_state(self, last: dict, error: bool):
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [last.get(name) for name in metrics]
        if error or last.get(FAIL_REASON_KEY):
            return TrialState.FAIL, None
        if not all(_finite_number(v) for v in values):
            return TrialState.FAIL, None
        rounds_total = last.get(ROUNDS_TOTAL_KEY)
        if rounds_total is not None and last.get("round", rounds_total) < rounds_total:
            return TrialState.PRUNED, None
        return TrialState.COMPLETE, values if len(values) > 1 else values[0]

