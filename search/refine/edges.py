"""Range edges: a best value found near the end of its searched range says the range may be cut too short.

A numeric range's outer EDGE_SHARE on either side (measured in log space for a log range), or the first or
last value of an ordered list (powers of two, a list of three or more numbers), counts as its edge. Each
finding proposes the range widened on that side by half its span (a factor of the span's square root for
log ranges; one more value for lists), kept inside what the parameter allows (spaces/methods.py). A range
already at that limit (dropout from 0) has nothing to widen and is not flagged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional

from search.numbers import is_number, show_number
from spaces.kinds import Categorical, Float, Int, Kind, PowerOfTwo, RatioTo

EDGE_SHARE = 0.15


@dataclass(frozen=True)
class Edge:
    param: str          # the space key
    side: str           # "low" or "high"
    best: Any           # the best trial's value
    searched: Kind      # the range searched
    proposed: Kind      # the range widened on that side

    def text(self) -> str:
        return (f"{self.param}: the best trial's {show_number(self.best)} lies at the {self.side} end of "
                f"{describe(self.searched)}; widen it to {describe(self.proposed)}")


def describe(kind: Kind) -> str:
    kind = kind.ratio if isinstance(kind, RatioTo) else kind
    if isinstance(kind, Categorical):
        return "[" + ", ".join(show_number(c) for c in kind.choices) + "]"
    if isinstance(kind, PowerOfTwo):
        return f"powers of two {kind.low}–{kind.high}"
    return f"{show_number(kind.low)}–{show_number(kind.high)}" + (" (log)" if getattr(kind, "log", False) else "")


def edge_findings(space: Mapping[str, Kind], best: Mapping[str, Any], limits: Mapping[str, Any]) -> List[Edge]:
    """The edges the best trial's values (`best`: space key -> value) sit at; `limits`: space key -> the
    spaces.methods.Param whose low/high bound what the parameter allows (missing: unbounded)."""
    found = []
    for key, kind in space.items():
        if not kind.searched or not is_number(best.get(key)):
            continue
        inner = kind.ratio if isinstance(kind, RatioTo) else kind
        edge = _edge(inner, float(best[key]), limits.get(key))
        if edge is not None:
            side, widened = edge
            found.append(Edge(key, side, best[key], kind,
                              replace(kind, ratio=widened) if isinstance(kind, RatioTo) else widened))
    return found


def _edge(kind: Kind, value: float, limit) -> Optional[tuple]:
    if isinstance(kind, PowerOfTwo):
        side = "low" if value <= kind.low else "high" if value >= kind.high else None
        if side is None:
            return None
        new = replace(kind, low=max(1, kind.low // 2)) if side == "low" else replace(kind, high=kind.high * 2)
        return (side, new) if new != kind and _allowed(new.low, new.high, limit) else None
    if isinstance(kind, Categorical):
        return _list_edge(kind, value, limit)
    if isinstance(kind, (Float, Int)):
        return _range_edge(kind, value, limit)
    return None


def _range_edge(kind, value: float, limit) -> Optional[tuple]:
    log = kind.log and kind.low > 0
    scale = (lambda v: math.log10(v)) if log else (lambda v: v)
    span = scale(kind.high) - scale(kind.low)
    where = (scale(value) - scale(kind.low)) / span if span > 0 else 0.5
    side = "low" if where <= EDGE_SHARE else "high" if where >= 1 - EDGE_SHARE else None
    if side is None:
        return None
    if log:
        factor = (kind.high / kind.low) ** 0.5
        low, high = (kind.low / factor, kind.high) if side == "low" else (kind.low, kind.high * factor)
    else:
        half = (kind.high - kind.low) / 2
        low, high = (kind.low - half, kind.high) if side == "low" else (kind.low, kind.high + half)
    low, high = _clamp(low, high, limit, kind)
    if isinstance(kind, Int):
        low, high = int(math.floor(low)), int(math.ceil(high))
    else:
        low, high = float(f"{low:.3g}"), float(f"{high:.3g}")
    if (low, high) == (kind.low, kind.high) or low >= high:
        return None
    return side, replace(kind, low=low, high=high)


def _list_edge(kind: Categorical, value: float, limit) -> Optional[tuple]:
    """An ordered list of three or more numbers: its first or last value is an edge; the next value out
    continues the list's steps (geometric where they are, as 1, 2, 4)."""
    values = list(kind.choices)
    if len(values) < 3 or not all(is_number(v) for v in values) or values != sorted(values):
        return None
    if value == values[0]:
        side, a, b = "low", values[1], values[0]
    elif value == values[-1]:
        side, a, b = "high", values[-2], values[-1]
    else:
        return None
    geometric = all(v > 0 for v in values) and math.isclose(values[1] / values[0], values[2] / values[1])
    new = b * (b / a) if geometric else b + (b - a)
    new = int(new) if all(isinstance(v, int) for v in values) else float(f"{new:.3g}")
    if not _allowed(new, new, limit) or new in values:
        return None
    return side, replace(kind, choices=(new, *values) if side == "low" else (*values, new))


def _clamp(low: float, high: float, limit, kind) -> tuple:
    """Inside what the parameter allows; an open bound is approached halfway, never reached."""
    if limit is not None and limit.low is not None and low < limit.low + (0 if not limit.low_open else 1e-12):
        low = (kind.low + limit.low) / 2 if limit.low_open else limit.low
    if limit is not None and limit.high is not None and high > limit.high - (0 if not limit.high_open else 1e-12):
        high = (kind.high + limit.high) / 2 if limit.high_open else limit.high
    return low, high


def _allowed(low: float, high: float, limit) -> bool:
    if limit is None:
        return True
    above = limit.low is None or (low > limit.low if limit.low_open else low >= limit.low)
    below = limit.high is None or (high < limit.high if limit.high_open else high <= limit.high)
    return above and below


def limits_for(method: str) -> Dict[str, Any]:
    """space key -> spaces.methods.Param for `method` (the ratios' own keys are bounded only by > 0)."""
    from spaces.methods import params_for

    return dict(params_for(method))


class SpaceEdges:
    """The edges a trial's configuration (Optuna's values, as Tune holds them) sits at in a space: what the
    progress lines flag when a new best trial comes in. It holds the space and the method only, no more of
    the spec: Tune pickles it with its callbacks (tuner.pkl), and the spec holds secrets."""

    def __init__(self, space: Mapping[str, Kind], method: str):
        self.space, self.method = dict(space), method

    def __call__(self, params: Mapping[str, Any]) -> List[Edge]:
        names = {key: kind.optuna_name(key) for key, kind in self.space.items() if kind.searched}
        if not all(name in params for name in names.values()):   # not a configuration of this space
            return []
        best = {key: self.space[key].decode(params[name]) for key, name in names.items()}
        return edge_findings(self.space, best, limits_for(self.method))
