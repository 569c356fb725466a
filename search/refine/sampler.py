"""The sampler that keeps a search inside the region its refiner chose (search/refine/refiner.py), in the
shape of Optuna's PartialFixedSampler: a wrapper around the search's own sampler."""
from __future__ import annotations

from typing import Any, Dict

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState


class RefinedSampler(optuna.samplers.BaseSampler):
    """A sampler kept inside a refined region of the space (search/refine/refiner.py decides the region),
    while every trial still records the space's original distributions.

    Why not hand Optuna narrowed distributions (Ray's `ask(fixed_distributions=...)`)? From Optuna
    5.0's source, checked on a study: TPESampler(multivariate=True) models jointly only the params of
    `IntersectionSearchSpace`, which keeps a param only while every finished trial recorded the *same*
    distribution, so after one narrowed trial finishes the param leaves the joint model (sampled
    univariately, with a warning per trial); a narrowed CategoricalDistribution raises "does not
    support dynamic value space" (`check_distribution_compatibility`); and fANOVA importances (the
    report) use the same intersection and would drop every refined param. With the distributions
    unchanged, all of these keep every earlier trial. The region is imposed here instead:

    - fixed params as Optuna's PartialFixedSampler does: left out of the relative search space (TPE
      models the rest jointly, from every earlier trial) and answered in `sample_independent`;
    - narrowed params by rejection: the base sampler's proposal is redrawn until it lies inside the
      region. TPE draws fresh candidates on each call, so this samples TPE's proposal conditioned on
      the region, its model built from all trials. After MAX_REDRAWS misses (TPE's model disagrees with
      the region, e.g. on a setting it finds irrelevant), the settings still outside are drawn uniformly
      inside it. Each redraw reads the trials from storage, hence the small cap.
    """

    MAX_REDRAWS = 16

    def __init__(self, base: optuna.samplers.BaseSampler, seed: int = 0):
        self.base = base
        self._uniform = optuna.samplers.RandomSampler(seed=seed)
        self.fixed: Dict[str, Any] = {}                      # Optuna name -> value
        self.narrowed: Dict[str, BaseDistribution] = {}      # Optuna name -> the part to sample from

    def set_region(self, fixed: Dict[str, Any], narrowed: Dict[str, BaseDistribution]) -> None:
        self.fixed, self.narrowed = dict(fixed), dict(narrowed)

    def inside(self, name: str, value: Any) -> bool:
        part = self.narrowed.get(name)
        if part is None:
            return name not in self.fixed or self.fixed[name] == value
        if isinstance(part, CategoricalDistribution):
            return value in part.choices
        return part.low <= value <= part.high

    def infer_relative_search_space(self, study, trial: FrozenTrial) -> Dict[str, BaseDistribution]:
        space = self.base.infer_relative_search_space(study, trial)
        return {name: dist for name, dist in space.items() if name not in self.fixed}

    def sample_relative(self, study, trial: FrozenTrial, search_space: Dict[str, BaseDistribution]) -> Dict[str, Any]:
        params: Dict[str, Any] = {}
        for _ in range(self.MAX_REDRAWS):
            params = self.base.sample_relative(study, trial, search_space)
            if all(self.inside(name, value) for name, value in params.items()):
                return params
        return {name: value if self.inside(name, value)
                else self._uniform.sample_independent(study, trial, name, self.narrowed[name])
                for name, value in params.items()}

    def sample_independent(self, study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if param_name in self.fixed:
            return self.fixed[param_name]
        for _ in range(self.MAX_REDRAWS):
            value = self.base.sample_independent(study, trial, param_name, param_distribution)
            if self.inside(param_name, value):
                return value
        return self._uniform.sample_independent(study, trial, param_name, self.narrowed[param_name])

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial: FrozenTrial, state: TrialState, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self._uniform.reseed_rng()
