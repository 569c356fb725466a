"""The default sampler: Optuna's GP sampler, also fed the trials the scheduler stopped early.

benchmarks/sampler_choice.py chose GP over TPE for the small searches this product runs. Optuna's
GPSampler fits its Gaussian process to COMPLETE trials only; under ASHA a third or more of a small search
is PRUNED, and a GP blind to those would keep proposing the region it was just told is poor. Here a
pruned trial counts with its last reported value, a pessimistic estimate of its final one (it was measured
earlier in training, and ASHA stopped it because it trailed its peers at that point): the same lower-fidelity
evidence the sensitivity analysis uses (search/refine/sensitivity.py) and that TPE takes from pruned trials.
"""
from __future__ import annotations

from typing import Any, Dict, List

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

GP_STARTUP_TRIALS = 4   # random trials before the GP: as in benchmarks/sampler_choice.py's gp arm


def pruned_as_complete(study: optuna.Study, search_space: Dict[str, BaseDistribution]) -> List[FrozenTrial]:
    """The study's pruned trials that reported a value and sampled every setting of `search_space`, as
    COMPLETE trials whose value is their last report (one objective only: pruning reports one value)."""
    if len(study.directions) != 1:
        return []
    trials = []
    for trial in study._get_trials(deepcopy=False, states=(TrialState.PRUNED,), use_cache=False):
        if not trial.intermediate_values or not search_space.keys() <= trial.params.keys():
            continue
        last_step = max(trial.intermediate_values)
        value = trial.intermediate_values[last_step]
        if value != value:   # NaN: a diverged trial tells the GP nothing it can fit
            continue
        trials.append(optuna.trial.create_trial(
            params=trial.params, distributions=trial.distributions, value=value, state=TrialState.COMPLETE))
    return trials


class PrunedAwareGPSampler(optuna.samplers.GPSampler):
    """GPSampler whose Gaussian process also sees pruned trials (at their last reported value)."""

    def __init__(self, seed: int):
        super().__init__(seed=seed, n_startup_trials=GP_STARTUP_TRIALS, warn_independent_sampling=False)

    def _sample_relative_impl(self, study: optuna.Study, completed_trials: List[FrozenTrial],
                              running_trials: List[FrozenTrial],
                              search_space: Dict[str, BaseDistribution]) -> Dict[str, Any]:
        seen = completed_trials + pruned_as_complete(study, search_space)
        return super()._sample_relative_impl(study, seen, running_trials, search_space)
