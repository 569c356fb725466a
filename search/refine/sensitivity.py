"""Hyperparameter sensitivity: which settings move the metric, by how much, and where to keep them.

Two views, computed from the stored trials only (no extra training):

* `importances(study)`: Optuna's fANOVA and PED-ANOVA importances over COMPLETE trials (on the
  study's own, Optuna-encoded params, e.g. ``r_log2``).
* `sensitivity_table(rows, params, metric, mode)`: the published-practice table, one row per
  setting: range tested, optimal range (the best bin), impact in points when the setting is moved
  to its worst tested bin (with a bootstrap interval), a rating (VERY HIGH > 4 points, HIGH 1-4,
  MEDIUM 0.5-1, LOW < 0.5; applied to the impact less its noise floor, the swing shuffled values
  give, so a setting that does nothing is not rated HIGH by chance) and one sentence of guidance.
  Built on `marginal_effects`, which bins one setting's values (from `search.store.results.trial_rows`)
  and bootstraps the mean metric per bin.

Small searches (5 to 20 trials) are the usual case, so the table is built from MIN_TRIALS_FOR_SENSITIVITY
trials on. A rating is given only where the evidence supports it: the impact exceeds its noise floor (a
permutation test at the 10% level), or LOW_FROM trials or more keep it within the noise (LOW); otherwise
the row says the setting is not yet distinguishable from noise and estimates how many more trials would
tell, were the effect as large as it looks now (the noise floor shrinks as 1/sqrt(trials)). Pruned trials
count as lower-fidelity evidence: their last reported value, with the rounds they reached as one more
factor of the additive model, so that having stopped early is not read as an effect of their settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from search.refine.importance import Importances, importances  # noqa: F401 (re-exported)
from search.numbers import is_number, show_number

MIN_TRIALS_FOR_SENSITIVITY = 4   # trials with a result (complete or pruned), of which MIN_COMPLETE complete
MIN_COMPLETE = 3
FIDELITY = "param__rounds_reached"   # the extra factor for pruned trials' lower-fidelity results
LOW_FROM = 10   # trials from which an impact within the noise is rated LOW rather than left open
ADJUST_FROM = 10   # trials from which the other settings' effects are removed (see `_adjusted`)
MAX_BINS = 4
MAX_DISCRETE = 5  # at most this many distinct numeric values: one bin per value
CI = 0.90
N_PERM = 40
BOUNDED_NAMES = ("accuracy", "acc", "f1", "exact_match", "precision", "recall", "auc", "rouge")


@dataclass(frozen=True)
class Bin:
    label: str           # "1.2e-3–4.7e-3" (observed min–max) or the single value
    low: object          # observed min (or the category)
    high: object         # observed max (or the category)
    n: int
    mean: float
    ci_low: float
    ci_high: float
    boot: Tuple[float, ...]  # bootstrap means, aligned across bins (same replicate index)


@dataclass(frozen=True)
class SensitivityRow:
    param: str
    range_tested: str
    optimal_range: str
    impact_points: float
    impact_ci: Tuple[float, float]
    rating: str
    guidance: str
    noise_floor: float = 0.0  # 90th percentile of the impact with this setting's values shuffled
    rated: bool = True                 # the evidence supports the rating (see the module's docstring)
    more_trials: Optional[int] = None  # where not: about how many more trials would tell (None: too many)
    complete: int = 0                  # the trials it rests on
    pruned: int = 0

    @property
    def verdict(self) -> str:
        """The rating where the evidence supports one, else what would settle it."""
        if self.rated:
            return self.rating
        more = f"~{self.more_trials} more trials would tell" if self.more_trials else "the effect looks near zero"
        return f"not yet distinguishable from noise ({more})"

    @property
    def evidence(self) -> str:
        return f"{self.complete}" + (f" + {self.pruned} pruned" if self.pruned else "")


def _span(low, high) -> str:
    return show_number(low, 3) if low == high else f"{show_number(low, 3)}–{show_number(high, 3)}"


def _column(param: str) -> str:
    return param if param.startswith("param_") else f"param_{param}"


def _complete(rows: Sequence[Dict[str, object]], metric: str) -> List[Dict[str, object]]:
    return [r for r in rows if r.get("state") == "COMPLETE" and is_number(r.get(metric))]


def evidence_rows(rows: Sequence[Dict[str, object]], metric: str) -> List[Dict[str, object]]:
    """The rows an analysis rests on: COMPLETE trials, and PRUNED ones with a last reported value (marked with
    the rounds they reached, FIDELITY), where some trials were pruned after fewer rounds than others ran."""
    complete = _complete(rows, metric)
    pruned = [r for r in rows if r.get("state") == "PRUNED" and is_number(r.get(metric)) and is_number(r.get("rounds"))]
    if not pruned:
        return complete
    return [{**r, FIDELITY: int(r["rounds"]) if is_number(r.get("rounds")) else None} for r in complete + pruned]


def enough_for_sensitivity(rows) -> bool:
    complete = sum(r["state"] == "COMPLETE" for r in rows)
    with_result = complete + sum(r["state"] == "PRUNED" for r in rows)
    return complete >= MIN_COMPLETE and with_result >= MIN_TRIALS_FOR_SENSITIVITY


def _binning(xs: List[object]) -> Tuple[List[Tuple[object, object, bool]], np.ndarray]:
    """Bins [(low, high, is_single_value)] in ascending order, and each value's bin index."""
    distinct = sorted(set(xs), key=lambda v: (not is_number(v), v if is_number(v) else str(v)))
    numeric = all(is_number(x) for x in xs)
    # one bin per value, unless numbers have so many values for so few trials that bins would hold one each
    if not numeric or (len(distinct) <= MAX_DISCRETE and len(xs) >= 2 * len(distinct)):
        where = {repr(v): i for i, v in enumerate(distinct)}
        return [(v, v, True) for v in distinct], np.array([where[repr(x)] for x in xs], dtype=int)
    x = np.array(xs, dtype=float)
    log = x.min() > 0 and x.max() / x.min() > 10  # spans more than a decade: edges in log space
    scaled = np.log10(x) if log else x
    n_bins = max(2, min(MAX_BINS, len(x) // 3))
    inner = np.unique(np.quantile(scaled, np.linspace(0, 1, n_bins + 1)[1:-1]))
    index = np.searchsorted(inner, scaled, side="right")
    used = [b for b in range(len(inner) + 1) if (index == b).any()]
    renumber = {b: i for i, b in enumerate(used)}
    bins = [(x[index == b].min(), x[index == b].max(), False) for b in used]
    return bins, np.array([renumber[b] for b in index], dtype=int)


def _assign(rows: List[Dict[str, object]], param: str):
    """(bins, index per row; -1 where the row lacks the setting)."""
    column = _column(param)
    present = [i for i, r in enumerate(rows) if r.get(column) is not None]
    if not present:
        return [], np.full(len(rows), -1, dtype=int)
    bins, sub = _binning([rows[i][column] for i in present])
    index = np.full(len(rows), -1, dtype=int)
    index[present] = sub
    return bins, index


def _partial_residuals(y: np.ndarray, own: np.ndarray, others: List[np.ndarray],
                       n_iter: int = 25) -> np.ndarray:
    """y less the other settings' bin effects, from an additive model over all bins (backfitting):
    a setting's swing is then not inflated by another setting being unevenly spread over its bins."""
    indices = [own] + others
    effects = [np.zeros(int(ix.max()) + 1 if (ix >= 0).any() else 0) for ix in indices]

    def contribution(k):
        ix = indices[k]
        return np.where(ix >= 0, effects[k][np.maximum(ix, 0)] if len(effects[k]) else 0.0, 0.0)

    base = y - y.mean()
    for _ in range(n_iter if others else 0):
        for k, ix in enumerate(indices):
            rest = base - sum(contribution(j) for j in range(len(indices)) if j != k)
            for b in range(len(effects[k])):
                effects[k][b] = rest[ix == b].mean()
            mask = ix >= 0
            if mask.any():  # centre so the grand mean stays in `base`
                effects[k] -= effects[k][ix[mask]].mean()
    return y - sum((contribution(j) for j in range(1, len(indices))), np.zeros_like(y))


def _adjusted(rows, param: str, metric: str, adjust_for: Sequence[str]):
    """(evidence rows, `param`'s bins, each row's bin, the metric less the other settings' additive effects)."""
    complete = evidence_rows(rows, metric)
    bins, own = _assign(complete, param)
    if not bins:
        return complete, [], own, np.zeros(0)
    y = np.array([float(r[metric]) for r in complete])
    fidelity = [_assign(complete, FIDELITY)[1]] if complete and FIDELITY in complete[0] else []
    others = [ix for ix in (_assign(complete, q)[1] for q in adjust_for if _column(q) != _column(param))
              if (ix >= 0).any()]
    # An additive model over every setting's bins has about as many effects as a small search has trials, and
    # would fit their noise: below ADJUST_FROM trials only the rounds pruned trials reached are adjusted for.
    if len(complete) < ADJUST_FROM:
        others = []
    return complete, bins, own, _partial_residuals(y, own, [ix for ix in others + fidelity if (ix >= 0).any()])


def _trend_axis(rows, param: str) -> Optional[np.ndarray]:
    """A numeric setting's values as a line's x (log10 where they span more than a decade), NaN where a row
    lacks it; None for a setting that is not numeric or takes one value."""
    values = [r.get(_column(param)) for r in rows]
    known = [v for v in values if v is not None]
    if len(known) < 3 or not all(is_number(v) for v in known) or len(set(known)) < 2:
        return None
    x = np.array([float(v) if v is not None else np.nan for v in values])
    log = np.nanmin(x) > 0 and np.nanmax(x) / np.nanmin(x) > 10
    return np.log10(x) if log else x


def _trend_swing(x: np.ndarray, y: np.ndarray) -> float:
    """How far a straight line through (x, y) moves across the range of x."""
    keep = ~np.isnan(x)
    x, y = x[keep], y[keep]
    if len(x) < 3 or x.max() == x.min():
        return 0.0
    slope = np.polyfit(x, y, 1)[0]
    return float(abs(slope) * (x.max() - x.min()))


def marginal_effects(rows: Sequence[Dict[str, object]], param: str, metric: str, mode: str,
                     n_boot: int = 200, seed: int = 0, adjust_for: Sequence[str] = ()) -> List[Bin]:
    """Mean `metric` per bin of `param` over the evidence rows (`evidence_rows`), with a bootstrap 90% interval
    (trials resampled within the bin). With `adjust_for` (other settings), the means are of the metric less
    those settings' additive bin effects, i.e. main effects rather than raw marginal means; pruned trials'
    rounds reached always count as such a setting.

    `mode` ("max"/"min") does not change the bins; it is accepted so callers pass one signature.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    _rows, bins, own, partial = _adjusted(rows, param, metric, adjust_for)
    rng = np.random.default_rng(seed)
    out = []
    for b, (low, high, single) in enumerate(bins):
        ys = partial[own == b]
        boot = ys[rng.integers(0, len(ys), size=(n_boot, len(ys)))].mean(axis=1) if n_boot else ys[:0]
        lo, hi = np.quantile(boot, [(1 - CI) / 2, (1 + CI) / 2]) if len(boot) else (ys.mean(), ys.mean())
        out.append(Bin(label=show_number(low, 3) if single else _span(low, high), low=low, high=high, n=len(ys),
                       mean=float(ys.mean()), ci_low=float(lo), ci_high=float(hi),
                       boot=tuple(float(v) for v in boot)))
    return out


def points_scale(rows: Sequence[Dict[str, object]], metric: str) -> float:
    """100 for a [0, 1]-bounded score (accuracy, f1, ...), so impacts read in points; else 1."""
    name = metric.lower()
    values = [float(r[metric]) for r in rows if r.get("state") == "COMPLETE" and is_number(r.get(metric))]
    bounded = any(key in name for key in BOUNDED_NAMES if key != "acc") or "acc" in name.split("_")
    return 100.0 if bounded and values and all(0.0 <= v <= 1.0 for v in values) else 1.0


def rating(impact_points: float) -> str:
    if impact_points > 4:
        return "VERY HIGH"
    if impact_points >= 1:
        return "HIGH"
    if impact_points >= 0.5:
        return "MEDIUM"
    return "LOW"


def _guidance(param: str, metric: str, mode: str, best: Bin, impact: float, rate: str,
              categorical: bool, thin: bool, rated: bool = True) -> str:
    where = f"use {param}={best.label}" if categorical or best.low == best.high \
        else f"keep {param} in {best.label}"
    verb = "drops" if mode == "max" else "rises"
    if not rated:
        text = f"best so far at {param}={best.label}; keep searching it"
    elif rate == "LOW":
        text = f"{param} barely moves {metric} ({impact:.2g} points, about what chance gives); " \
               "set it for cost or convenience"
    else:
        text = f"{where}; outside it {metric} {verb} up to {impact:.3g} points"
    return text + (" (few trials per bin: tentative)" if thin else "") + "."


def sensitivity_row(rows: Sequence[Dict[str, object]], param: str, metric: str, mode: str,
                    n_boot: int = 200, seed: int = 0, adjust_for: Sequence[str] = ()) -> Optional[SensitivityRow]:
    bins = marginal_effects(rows, param, metric, mode, n_boot=n_boot, seed=seed, adjust_for=adjust_for)
    name = param[len("param_"):] if param.startswith("param_") else param
    if not bins:
        return None
    scale = points_scale(rows, metric)
    sign = 1.0 if mode == "max" else -1.0
    best = max(bins, key=lambda b: (sign * b.mean, b.n))
    worst = min(bins, key=lambda b: (sign * b.mean, -b.n))
    impact = abs(best.mean - worst.mean) * scale
    if best.boot and worst.boot:
        diffs = np.abs(np.array(best.boot) - np.array(worst.boot)) * scale
        ci = tuple(float(v) for v in np.quantile(diffs, [(1 - CI) / 2, (1 + CI) / 2]))
    else:
        ci = (impact, impact)
    trend = _trend(rows, param, metric, adjust_for, scale, n_boot, seed)
    use_line = trend is not None and trend[0] > impact   # a steady rise or fall: a line tells it from fewer trials
    if use_line:
        impact, ci = trend
    values = [b.low for b in bins] + [b.high for b in bins]
    categorical = not all(is_number(v) for v in values)
    if categorical or all(b.low == b.high for b in bins):
        tested = ", ".join(b.label for b in bins)
    else:
        tested = _span(min(values), max(values))
    if len(bins) < 2:
        tested += " (one value only)"
    floor = _noise_floor(rows, param, metric, mode, adjust_for, scale, seed, line=use_line)
    rate = rating(max(0.0, impact - floor))  # a swing no bigger than chance's is rated LOW
    thin = min(b.n for b in bins) < 3
    evidence = evidence_rows(rows, metric)
    pruned = sum(r.get("state") == "PRUNED" for r in evidence)
    rated = len(bins) > 1 and (impact > floor or len(evidence) >= LOW_FROM)
    return SensitivityRow(param=name, range_tested=tested, optimal_range=best.label,
                          impact_points=float(impact), impact_ci=ci, rating=rate,
                          guidance=_guidance(name, metric, mode, best, impact, rate, categorical, thin, rated),
                          noise_floor=floor, rated=rated,
                          more_trials=None if rated else more_trials_to_tell(len(evidence), impact, floor),
                          complete=len(evidence) - pruned, pruned=pruned)


MAX_MORE_TRIALS = 200   # beyond this, "the effect looks near zero"


def more_trials_to_tell(n: int, impact: float, floor: float) -> Optional[int]:
    """About how many trials beyond `n` would take an effect of `impact` past its noise floor, which shrinks
    as 1/sqrt(trials): n * (floor / impact)^2 in all. None where that is over MAX_MORE_TRIALS more."""
    if impact <= 0:
        return None
    more = int(np.ceil(n * (floor / impact) ** 2)) - n
    return max(1, more) if more <= MAX_MORE_TRIALS else None


def _trend(rows, param: str, metric: str, adjust_for, scale: float, n_boot: int, seed: int):
    """(swing, its bootstrap 90% interval) of a straight line through the adjusted metric against a numeric
    setting, in points; None for a setting that is not numeric."""
    complete, _bins, _own, partial = _adjusted(rows, param, metric, adjust_for)
    x = _trend_axis(complete, param)
    if x is None:
        return None
    swing = _trend_swing(x, partial) * scale
    rng = np.random.default_rng(seed)
    boot = [_trend_swing(x[pick], partial[pick]) * scale
            for pick in rng.integers(0, len(x), size=(n_boot, len(x)))] if n_boot else [swing]
    return swing, tuple(float(v) for v in np.quantile(boot, [(1 - CI) / 2, (1 + CI) / 2]))


def _noise_floor(rows, param, metric, mode, adjust_for, scale, seed, n_perm=N_PERM, line: bool = False) -> float:
    """90th percentile of the impact (the best-minus-worst swing of the bins, or with `line` of a straight
    line) when `param`'s values are shuffled across the trials: what this many noisy trials give a setting
    that does nothing."""
    complete = evidence_rows(rows, metric)
    column = _column(param)
    values = [r.get(column) for r in complete]
    rng = np.random.default_rng(seed + 1)
    swings = []
    for _ in range(n_perm):
        order = rng.permutation(len(values))
        shuffled = [{**r, column: values[i]} for r, i in zip(complete, order)]
        shuffled, bins, own, partial = _adjusted(shuffled, param, metric, adjust_for)
        if line:
            swings.append(_trend_swing(_trend_axis(shuffled, param), partial) * scale)
        else:
            means = [partial[own == b].mean() for b in range(len(bins))]
            swings.append((max(means) - min(means)) * scale if means else 0.0)
    return float(np.quantile(swings, 0.9)) if swings else 0.0


def sensitivity_table(rows: Sequence[Dict[str, object]], params: Optional[Sequence[str]], metric: str,
                      mode: str, n_boot: int = 200, seed: int = 0) -> List[SensitivityRow]:
    """One row per setting (names with or without the ``param_`` prefix; None: every param_ column
    in `rows`), sorted by impact, largest first. Settings no COMPLETE trial has are left out.
    Each setting's bin means are adjusted for the other listed settings (see `marginal_effects`)."""
    if params is None:
        params = sorted({k for r in rows for k in r if k.startswith("param_")})
    table = [row for p in params
             if (row := sensitivity_row(rows, p, metric, mode, n_boot=n_boot, seed=seed,
                                        adjust_for=params)) is not None]
    return sorted(table, key=lambda r: (-r.impact_points, r.param))


def to_markdown(table: Sequence[SensitivityRow]) -> str:
    head = ["Setting", "Range tested", "Optimal range", "Impact (points)", "90% CI", "Rating", "Guidance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r.param, r.range_tested, r.optimal_range, f"{r.impact_points:.2f}",
                 f"{r.impact_ci[0]:.2f}–{r.impact_ci[1]:.2f}", r.rating, r.guidance]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def summary_tables(rows: Sequence[Dict[str, object]], study, metric: str, mode: str) -> Dict[str, List[dict]]:
    """The sensitivity table and the importances as records (W&B Tables at the end of a search);
    empty when there are too few complete trials to tell an effect from noise."""

    if not enough_for_sensitivity(rows):
        return {}
    sensitivity = [{"setting": r.param, "range_tested": r.range_tested, "optimal_range": r.optimal_range,
                    "impact_points": r.impact_points, "impact_ci_low": r.impact_ci[0],
                    "impact_ci_high": r.impact_ci[1], "noise_floor": r.noise_floor, "rating": r.rating,
                    "guidance": r.guidance}
                   for r in sensitivity_table(rows, None, metric, mode)]
    ranked = [{"evaluator": method, "param": name, "importance": score}
              for method, scores in importances(study).items() for name, score in scores.items()]
    return {"sensitivity": sensitivity, "importances": ranked}

