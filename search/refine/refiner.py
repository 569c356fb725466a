"""Refinement: the sensitivity analysis fed back into the running search, in the same Optuna study.

Every `search.refine_every` finished trials (the first time once REFINE_MIN_TRIALS trials are complete:
acting on a setting needs firmer evidence than the report's rating of it), `Refiner.maybe_refine` analyses
every trial so far:

- a setting is fixed at the best trial's value when it is rated LOW (search/refine/sensitivity.py), its
  impact does not beat noise (see below) and every importance evaluator that rated it (fANOVA,
  PED-ANOVA) gives it less than `refine_min_importance`. Never all of them: one stays searched.
- a setting whose impact beats noise (the lower end of its 90% interval exceeds the noise floor, the
  swing its shuffled values give: scale-free, so it works for losses as for accuracies, where the
  point-based rating would call a real 0.2 loss swing LOW) and whose importance reaches
  `refine_min_importance` for some evaluator is narrowed to its best bins (the contiguous run around
  the best bin of those whose bootstrap interval reaches the best bin's mean), widened to hold the
  best trial's value and to at least `refine_min_width` of its original range, on the sampler's
  scale (log for log ranges, the exponent for powers of two); a categorical keeps its good and its
  untried choices, at least two. A later refinement only narrows further, inside the region in force.
  Both tests are needed: TPE samples settings together, so an irrelevant one drawn alongside good
  learning rates can show a binned swing beyond noise (seen: lora_dropout with no effect at all,
  "31.6 points"), which the forest-based importance does not credit.
- a setting no evaluator rated (importance unknown) is left as it is.

Earlier trials stay in the study and keep informing the sampler (search/refine/sampler.py says how).
Each refinement is logged and appended to the study's user attribute "refinements" as
`{"after_trials", "fixed": {param: value}, "narrowed": {param: [low, high] or [kept choices]},
"reason"}` with the user-facing names of trials.csv; the region in force is all of them in order.
Trials sampled after one carry the user attribute "refinement" (its index).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from search.numbers import show_number
from search.refine.sensitivity import Bin, importances, marginal_effects, sensitivity_table
from search.store.keys import REFINEMENT_ATTR, REFINEMENTS_ATTR
from search.store.results import best_row, trial_rows
from spaces.kinds import Kind

log = logging.getLogger("peft_search")

NOT_WORTH_IT = 0.9                 # a range keeping this share of the one in force is left as it is


@dataclass(frozen=True)
class SearchedParam:
    name: str          # user-facing: trials.csv's param_* column without the prefix
    optuna_name: str   # what the study stores (e.g. r_log2 for r)
    kind: Kind

    @property
    def distribution(self):
        return self.kind.to_optuna()


def searched_params(spec) -> List[SearchedParam]:
    from search.spec.params import display_name

    return [SearchedParam(display_name(key, kind), kind.optuna_name(key), kind)
            for key, kind in spec.space.items() if kind.searched]


REFINE_MIN_TRIALS = 10


@dataclass(frozen=True)
class RefineSettings:
    every: int                          # finished trials between refinements (0: off)
    min_importance: float = 0.1         # fix only below this importance (importances sum to 1)
    min_width: float = 0.25             # a narrowed range keeps at least this share of the original
    min_trials: int = REFINE_MIN_TRIALS

    @classmethod
    def from_search_section(cls, search) -> "RefineSettings":
        return cls(search.refine_every, search.refine_min_importance, search.refine_min_width)


@dataclass
class Refinement:
    """What one refinement changes (user-facing names and values) and why."""
    fixed: Dict[str, Any] = field(default_factory=dict)
    narrowed: Dict[str, list] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.fixed or self.narrowed)

    def to_dict(self, after_trials: int) -> Dict[str, Any]:
        return {"after_trials": after_trials, "fixed": dict(self.fixed), "narrowed": dict(self.narrowed),
                "reason": "; ".join(self.notes)}


# --- the decision, from trial rows alone ------------------------------------------------------------
def plan_refinement(rows: Sequence[Dict[str, object]], params: Sequence[SearchedParam], metric: str, mode: str,
                    importance: Mapping[str, Optional[float]], settings: RefineSettings,
                    fixed: Mapping[str, Any] = (), narrowed: Mapping[str, list] = ()) -> Refinement:
    """The next refinement given trial rows (search.store.results.trial_rows), each setting's importance
    (None: unknown, left as it is) and the region in force (`fixed`, `narrowed`)."""
    fixed, narrowed = dict(fixed), dict(narrowed)
    out = Refinement()
    best = best_row(list(rows), metric, mode)
    if best is None:
        out.notes.append("no complete trial")
        return out
    names = [p.name for p in params]
    table = {row.param: row for row in sensitivity_table(rows, names, metric, mode)}
    free = [p for p in params if p.name not in fixed and p.name in table and importance.get(p.name) is not None
            and best.get(f"param_{p.name}") is not None]
    for p in _to_fix(free, table, importance, settings, n_searched=len(params) - len(fixed)):
        row = table[p.name]
        out.fixed[p.name] = best[f"param_{p.name}"]
        fixed_at = show_number(best[f'param_{p.name}'], 3)
        out.notes.append(f"{p.name} fixed at {fixed_at}: LOW impact ({row.impact_points:.2g} "
                         f"points, noise {row.noise_floor:.2g}), importance {importance[p.name]:.2f} "
                         f"< {settings.min_importance:g}")
    for p in free:
        row = table[p.name]
        if p.name in out.fixed or not _beats_noise(row) or importance[p.name] < settings.min_importance:
            continue
        bins = marginal_effects(rows, p.name, metric, mode, adjust_for=names)
        new = _narrowed(p, bins, mode, best[f"param_{p.name}"], narrowed.get(p.name), settings.min_width)
        if new is not None:
            out.narrowed[p.name] = new
            out.notes.append(f"{p.name} narrowed to {_show(p, new)}: {row.rating} impact "
                             f"({row.impact_points:.3g} points, 90% CI from {row.impact_ci[0]:.3g} > noise "
                             f"{row.noise_floor:.3g}), importance {importance[p.name]:.2f}, best range "
                             f"{row.optimal_range}")
    if not out.changed:
        out.notes.append("nothing to change: " + ", ".join(
            f"{r.param} {r.rating} (importance {_show_importance(importance.get(r.param))})" for r in table.values()))
    return out


def _to_fix(free: List[SearchedParam], table, importance, settings: RefineSettings,
            n_searched: int) -> List[SearchedParam]:
    chosen = [p for p in free if table[p.name].rating == "LOW" and not _beats_noise(table[p.name])
              and importance[p.name] < settings.min_importance]
    if chosen and len(chosen) >= n_searched:   # never fix every setting: the most important stays searched
        chosen.remove(max(chosen, key=lambda p: (importance[p.name], table[p.name].impact_points)))
    return chosen


def _show_importance(value: Optional[float]) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _beats_noise(row) -> bool:
    return row.impact_ci[0] > row.noise_floor


def _good_run(bins: List[Bin], mode: str, ordered: bool) -> List[Bin]:
    """The bins whose bootstrap interval reaches the best bin's mean; for an ordered setting, only the
    contiguous run of them around the best bin."""
    sign = 1.0 if mode == "max" else -1.0
    best = max(bins, key=lambda b: (sign * b.mean, b.n))
    good = [(b.ci_high if mode == "max" else b.ci_low) * sign >= best.mean * sign for b in bins]
    if not ordered:
        return [b for b, ok in zip(bins, good) if ok]
    at = bins.index(best)
    lo = hi = at
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(bins) - 1 and good[hi + 1]:
        hi += 1
    return bins[lo:hi + 1]


def _narrowed(p: SearchedParam, bins: List[Bin], mode: str, best_value, current: Optional[list],
              min_width: float) -> Optional[list]:
    """The new narrowed range (user-facing) of `p`, or None when it stays as it is."""
    if not bins or best_value is None:
        return None
    dist = p.distribution
    if isinstance(dist, CategoricalDistribution):
        return _narrowed_choices(p, dist, bins, mode, best_value, current, min_width)
    run = _good_run(bins, mode, ordered=True)
    span = [p.kind.encode(v) for v in (run[0].low, run[-1].high, best_value)]
    if any(v is None for v in span):
        return None
    bounds = (dist.low, dist.high) if current is None else tuple(p.kind.encode(v) for v in current)
    if not bounds[0] <= span[2] <= bounds[1]:
        return None   # the best trial lies outside the region in force (sampled before it): keep it
    found = _numeric_range(dist, bounds, min(span), max(span), min_width)
    return None if found is None else [p.kind.decode(v) for v in found]


def _scale(dist, value: float) -> float:
    return math.log(value) if dist.log else float(value)


def _numeric_range(dist, bounds: Tuple[float, float], low: float, high: float,
                   min_width: float) -> Optional[Tuple[Any, Any]]:
    """[low, high] (Optuna values) widened to `min_width` of the distribution's range and placed inside
    `bounds`; None when it keeps nearly all of `bounds`."""
    full = _scale(dist, dist.high) - _scale(dist, dist.low)
    lo_b, hi_b = _scale(dist, bounds[0]), _scale(dist, bounds[1])
    a, b = _scale(dist, low), _scale(dist, high)
    width = min(max(b - a, min_width * full), hi_b - lo_b)
    start = min(max((a + b - width) / 2, lo_b), hi_b - width)
    lo, hi = (math.exp(x) if dist.log else x for x in (start, start + width))
    step = dist.step if dist.step is not None else (1 if isinstance(dist, IntDistribution) else None)
    if step is None:   # 3 significant digits, outward, to read well in the log and the report
        lo, hi = _round_sig(lo, math.floor), _round_sig(hi, math.ceil)
    lo, hi = max(lo, bounds[0]), min(hi, bounds[1])     # rounding, or exp(log(x)), may step over a bound
    if step is not None:   # outward onto the grid, keeping at least two values
        lo = dist.low + math.floor((lo - dist.low) / step + 1e-9) * step
        hi = dist.low + math.ceil((hi - dist.low) / step - 1e-9) * step
        if hi - lo < step:
            hi, lo = (hi + step, lo) if hi + step <= bounds[1] else (hi, lo - step)
        if isinstance(dist, IntDistribution):
            lo, hi = int(round(lo)), int(round(hi))
    if _scale(dist, hi) - _scale(dist, lo) >= NOT_WORTH_IT * (hi_b - lo_b):
        return None
    return lo, hi


def _round_sig(value: float, direction) -> float:
    if value == 0:
        return 0.0
    unit = 10.0 ** (math.floor(math.log10(abs(value))) - 2)
    return float(f"{direction(value / unit) * unit:.3g}")


def _narrowed_choices(p: SearchedParam, dist: CategoricalDistribution, bins: List[Bin], mode: str, best_value,
                      current: Optional[list], min_width: float) -> Optional[list]:
    allowed = list(dist.choices) if current is None else [p.kind.encode(v) for v in current]
    sign = 1.0 if mode == "max" else -1.0
    ranked = [p.kind.encode(b.low) for b in sorted(bins, key=lambda b: -sign * b.mean)]
    tried = set(ranked)
    keep = {p.kind.encode(b.low) for b in _good_run(bins, mode, ordered=False)} | {p.kind.encode(best_value)}
    keep |= {c for c in dist.choices if c not in tried}            # no evidence against an untried choice
    for choice in ranked:                                           # at least two, and the minimum share
        if len(keep) >= max(2, math.ceil(min_width * len(dist.choices))):
            break
        keep.add(choice)
    kept = [c for c in allowed if c in keep]
    if p.kind.encode(best_value) not in kept or len(kept) < 2 or len(kept) == len(allowed):
        return None
    return [p.kind.decode(c) for c in kept]


def _show(p: SearchedParam, values: list) -> str:
    if isinstance(p.distribution, CategoricalDistribution):
        return "{" + ", ".join(show_number(v, 3) for v in values) + "}"
    return f"{show_number(values[0], 3)}–{show_number(values[1], 3)}"


# --- the refiner a search holds ----------------------------------------------------------------------
class Refiner:
    """Decides when to refine, keeps the region in force, and hands it to the study's RefinedSampler."""

    def __init__(self, params: Sequence[SearchedParam], metric: str, mode: str, settings: RefineSettings):
        self.params, self.metric, self.mode, self.settings = list(params), metric, mode, settings
        self.fixed: Dict[str, Any] = {}
        self.narrowed: Dict[str, list] = {}
        self.history: List[Dict[str, Any]] = []
        self._last_at = 0

    @classmethod
    def from_spec(cls, spec) -> Optional["Refiner"]:
        if not spec.search.refine_every:
            return None
        return cls(searched_params(spec), spec.objective.metric, spec.objective.mode,
                   RefineSettings.from_search_section(spec.search))

    @property
    def index(self) -> Optional[int]:
        return len(self.history) - 1 if self.history else None

    def attach(self, study) -> None:
        """Take up the refinements a (resumed) study holds and apply them to its sampler."""
        self.history = list(study.user_attrs.get(REFINEMENTS_ATTR, []))
        for entry in self.history:
            self._apply(entry)
        self._last_at = self.history[-1]["after_trials"] if self.history else 0
        self._push(study.sampler)

    def mark(self, trial) -> None:
        if self.index is not None:
            trial.set_user_attr(REFINEMENT_ATTR, self.index)

    def maybe_refine(self, study) -> Optional[Dict[str, Any]]:
        """Refine when due; returns the recorded refinement, or None."""
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() for t in trials)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        if finished - self._last_at < self.settings.every or complete < self.settings.min_trials:
            return None
        self._last_at = finished
        rows = trial_rows(trials, [self.metric])
        plan = plan_refinement(rows, self.params, self.metric, self.mode, self.importance(study), self.settings,
                               self.fixed, self.narrowed)
        if not plan.changed:
            log.info("refinement check after %d finished trials: %s", finished, "; ".join(plan.notes))
            return None
        entry = plan.to_dict(finished)
        self.history.append(entry)
        study.set_user_attr(REFINEMENTS_ATTR, self.history)
        self._apply(entry)
        self._push(study.sampler)
        log.info("refinement %d after %d finished trials: %s", self.index, finished, entry["reason"])
        return entry

    def importance(self, study, scores: Optional[Mapping[str, Mapping[str, float]]] = None
                   ) -> Dict[str, Optional[float]]:
        """Per setting, the largest importance any evaluator gives it (None if none rated it); `scores`: the
        study's importances where the caller computed them already."""
        scores = importances(study) if scores is None else scores
        out: Dict[str, Optional[float]] = {}
        for p in self.params:
            found = [by_name[p.optuna_name] for by_name in scores.values() if p.optuna_name in by_name]
            out[p.name] = max(found) if found else None
        return out

    def _apply(self, entry: Mapping[str, Any]) -> None:
        for name, value in entry.get("fixed", {}).items():
            self.fixed[name] = value
            self.narrowed.pop(name, None)
        self.narrowed.update(entry.get("narrowed", {}))

    def _push(self, sampler) -> None:
        from search.refine.sampler import RefinedSampler

        if not isinstance(sampler, RefinedSampler):
            raise TypeError(f"refinement needs the study's sampler to be a RefinedSampler, "
                            f"got {type(sampler).__name__}")
        by_name = {p.name: p for p in self.params}
        fixed = {by_name[n].optuna_name: by_name[n].kind.encode(v) for n, v in self.fixed.items()}
        narrowed = {by_name[n].optuna_name: _distribution(by_name[n], values) for n, values in self.narrowed.items()}
        sampler.set_region(fixed, narrowed)


def _distribution(p: SearchedParam, values: list):
    """The part of `p`'s distribution a narrowed range (user-facing) leaves."""
    dist = p.distribution
    encoded = [p.kind.encode(v) for v in values]
    if isinstance(dist, CategoricalDistribution):
        return CategoricalDistribution(encoded)
    if isinstance(dist, IntDistribution):
        return IntDistribution(encoded[0], encoded[1], log=dist.log, step=dist.step)
    return FloatDistribution(encoded[0], encoded[1], log=dist.log, step=dist.step)
