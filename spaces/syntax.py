"""The YAML syntax of `space:` entries, parsed into parameter kinds (spaces/kinds.py).

    r: [1, 2, 4, 8]                          a list: categorical
    learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}    a range: int or float (by the
                                             parameter's type, else by the values' types)
    batch_size: {low: 8, high: 64, step: 8}  a stepped range
    r: {power_of_two: [1, 64]}               powers of two, ordered for the sampler
    lora_alpha: {ratio_to: r, ratio: [1, 2]} a ratio to another parameter
    use_dora: true                           a scalar: fixed (also {fixed: VALUE}, {categorical: [...]})
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from spaces.kinds import (Categorical, Fixed, Float, Int, Kind, KindError, PowerOfTwo, RatioTo, _is_int, _is_number,
                          _show)

_RANGE_KEYS = ("low", "high", "log", "step")


def _check_keys(raw: Mapping, known: Sequence[str]) -> None:
    unknown = [key for key in raw if key not in known]
    if unknown:
        raise KindError(f"unknown key {unknown[0]!r}; known keys are: {', '.join(known)}", f".{unknown[0]}")


def _as_float(value: Any, key: str) -> float:
    """Numbers, and strings such as '1e-4' that YAML 1.1 reads as strings (a frequent surprise)."""
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise KindError(f"must be a number, got {_show(value)}", f".{key}")


def parse_kind(raw: Any, value_type: Optional[str] = None,
               coerce: Optional[Callable[[Any], Any]] = None) -> Kind:
    """Build a kind from its YAML form.

    `value_type` ("int", "float", or None = by the values) decides between Int and Float ranges;
    `coerce` converts each categorical choice or fixed value (raising KindError when it cannot).
    """
    coerce = coerce or (lambda value: value)
    if isinstance(raw, list):
        return Categorical(tuple(_choice(coerce(item)) for item in raw))
    if isinstance(raw, dict):
        if "power_of_two" in raw:
            _check_keys(raw, ("power_of_two",))
            bounds = raw["power_of_two"]
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise KindError(f"must be a list [low, high], got {bounds!r}", ".power_of_two")
            return PowerOfTwo(bounds[0], bounds[1])
        if "ratio_to" in raw:
            _check_keys(raw, ("ratio_to", "ratio"))
            if "ratio" not in raw:
                raise KindError("needs `ratio:` (a range, list or number)")
            try:
                ratio = parse_kind(raw["ratio"], "float")
            except KindError as exc:
                raise KindError(exc.message, ".ratio" + exc.subpath) from None
            return RatioTo(raw["ratio_to"], ratio)
        if "fixed" in raw:
            _check_keys(raw, ("fixed",))
            value = raw["fixed"]
            return Fixed(tuple(value) if isinstance(value, list) else coerce(value))
        if "categorical" in raw:
            _check_keys(raw, ("categorical",))
            if not isinstance(raw["categorical"], list):
                raise KindError(f"must be a list, got {raw['categorical']!r}", ".categorical")
            return Categorical(tuple(_choice(coerce(item)) for item in raw["categorical"]))
        _check_keys(raw, _RANGE_KEYS)
        for key in ("low", "high"):
            if key not in raw:
                raise KindError(f"a range needs both low and high; `{key}` is missing")
        log = raw.get("log", False)
        if value_type == "int" or (value_type is None and _is_int(raw["low"]) and _is_int(raw["high"])
                                   and _is_int(raw.get("step", 1))):
            for key in ("low", "high", "step"):
                if key in raw and not _is_int(raw[key]):
                    raise KindError(f"must be an integer, got {_show(raw[key])}", f".{key}")
            return Int(raw["low"], raw["high"], step=raw.get("step", 1), log=log)
        step = raw.get("step")
        return Float(_as_float(raw["low"], "low"), _as_float(raw["high"], "high"), log=log,
                     step=None if step is None else _as_float(step, "step"))
    return Fixed(coerce(raw))


def _choice(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
