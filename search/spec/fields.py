"""Typed, self-validating spec sections: the machinery shared by every section of a spec.

A section is a frozen dataclass whose fields carry their rules in `metadata` (built with `rule`):
type, bounds, choices, pattern, required. `Section.__post_init__` checks every rule, so a section
built in code is as checked as one read from YAML; `Section.parse` reads a YAML mapping, collecting
*all* problems (unknown keys, wrong types, bad values) as `key.path: what is wrong, got X` lines.
"""
from __future__ import annotations

import difflib
import math
import numbers
import re
import reprlib
from dataclasses import MISSING, field, fields
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

from spaces.kinds import KindError
from spaces.methods import Param


class SpecError(ValueError):
    """An invalid spec; `problems` holds one line per problem, each starting with its key path."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems) if self.problems else "invalid spec")


# Values echoed in messages are cut short: a problem is one line, even when the value is a 10 MB string.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 100
_SHORT.maxlist = _SHORT.maxtuple = 10


def show(value: Any) -> str:
    """A value for a message: strings quoted with their type, so `'8' (str)` stands out from 8."""
    if isinstance(value, str):
        return f"{_SHORT.repr(value)} (str)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    return _SHORT.repr(value)


def unknown_key(path: str, key: Any, known: Iterable[str], hint: str = "") -> str:
    known = list(known)
    name = str(key)
    if len(name) > _SHORT.maxstring:
        name = _SHORT.repr(name)   # shortened; no key that long is close to a known one
    close = difflib.get_close_matches(name, known, n=1) if not hint and str(key) == name else []
    maybe = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"{path}.{name}" if path else name
    return f"{where}: unknown key{maybe}{hint}; known keys are: {', '.join(known)}"


def rule(default: Any = MISSING, type: str = "str", *, low: Optional[float] = None, low_open: bool = False,
         high: Optional[float] = None, high_open: bool = False, choices: Optional[Sequence[Any]] = None,
         pattern: Optional[str] = None, nullable: bool = False, param: Optional[Param] = None,
         section: Optional[type] = None, repr: bool = True, words: Sequence[str] = ()):
    """A dataclass field with its checking rules; `repr=False` keeps a secret out of the object's repr.

    `type`: int | float | bool | str | names (a name, or several as a tuple) | section
    (a nested Section class, given as `section`; YAML true/false sets its `enabled` field).
    `param` reuses a spaces.methods.Param's type and bounds. `words`: strings accepted besides the type
    (e.g. `auto` for a number the search may choose itself); the bounds do not apply to them.
    """
    meta = dict(type=type, low=low, low_open=low_open, high=high, high_open=high_open, choices=choices,
                pattern=pattern, nullable=nullable, param=param, section=section, words=tuple(words))
    if type == "section":
        return field(default_factory=section, metadata=meta, repr=repr)
    if default is MISSING:
        return field(metadata=meta, repr=repr)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use an immutable default (tuple) for spec fields")
    return field(default=default, metadata=meta, repr=repr)


def coerce(value: Any, meta: Dict[str, Any]) -> Any:
    """`value` in the field's type, or KindError (a message without the key path)."""
    if meta["param"] is not None:
        return meta["param"].coerce(value)
    if isinstance(value, str) and value in meta.get("words", ()):
        return value
    if value is None:
        if meta["nullable"]:
            return None
        raise KindError("must be given a value, got nothing (null)")
    kind = meta["type"]
    if kind == "int":
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            alternatives = "".join(f" or {word}" for word in meta.get("words", ()))
            raise KindError(f"must be an integer{alternatives}, got {show(value)}")
        return int(value)
    if kind == "float":
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise KindError(f"must be a number, got {show(value)}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise KindError(f"must be true or false, got {show(value)}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise KindError(f"must be a string, got {show(value)}")
        return value
    if kind == "names":  # one name stays a str, several become a tuple (as Ray Tune's metric/mode)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) and item for item in value):
            return value[0] if len(value) == 1 else tuple(value)
        raise KindError(f"must be a name or a non-empty list of names, got {show(value)}")
    if kind == "section":
        if isinstance(value, meta["section"]):
            return value
        raise KindError(f"must be a mapping, got {show(value)}")
    raise TypeError(f"unknown field type {kind!r}")  # a bug in a section, not in the spec


def check(value: Any, meta: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a value of the right type, or None."""
    if meta["param"] is not None:
        return meta["param"].check(value)
    if value is None or (isinstance(value, str) and value in meta.get("words", ())):
        return None
    low, high = meta["low"], meta["high"]
    if low is not None and (value <= low if meta["low_open"] else value < low):
        return f"must be {'>' if meta['low_open'] else '>='} {_num(low)}, got {value}"
    if high is not None and (value >= high if meta["high_open"] else value > high):
        return f"must be {'<' if meta['high_open'] else '<='} {_num(high)}, got {value}"
    if meta["choices"] is not None:
        bad = [item for item in (value if isinstance(value, tuple) else (value,)) if item not in meta["choices"]]
        if bad:
            return f"must be one of {', '.join(map(str, meta['choices']))}, got {bad[0]!r}"
    if meta["pattern"] is not None and not re.fullmatch(meta["pattern"], value):
        return f"must match {meta['pattern']}, got {value!r}"
    return None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class Section:
    """Mixin for frozen dataclass sections. Subclasses set PATH and may add `extra_problems`."""

    PATH: ClassVar[str] = ""

    def __post_init__(self):
        problems = self.field_problems()
        if not problems:
            problems = self.extra_problems()
        if problems:
            raise SpecError(problems)

    def key(self, name: str) -> str:
        return f"{self.PATH}.{name}" if self.PATH else name

    def field_problems(self) -> List[str]:
        problems = []
        for spec_field in fields(self):
            if "type" not in spec_field.metadata:
                continue
            value = getattr(self, spec_field.name)
            try:
                value = coerce(value, spec_field.metadata)
            except KindError as exc:
                problems.append(f"{self.key(spec_field.name)}: {exc.message}")
                continue
            object.__setattr__(self, spec_field.name, value)  # e.g. 0 -> 0.0 for a float field
            message = check(value, spec_field.metadata)
            if message:
                problems.append(f"{self.key(spec_field.name)}: {message}")
        return problems

    def extra_problems(self) -> List[str]:
        """Checks across fields; run only when every field is fine on its own."""
        return []

    @classmethod
    def known_keys(cls) -> List[str]:
        return [f.name for f in fields(cls) if "type" in f.metadata]

    @classmethod
    def read(cls, raw: Any, problems: List[str], path: Optional[str] = None,
             hints: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, Any], bool]:
        """Typed values of the keys present in `raw`, and whether all of them were fine."""
        path = cls.PATH if path is None else path
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            problems.append(f"{path}: must be a mapping of keys ({', '.join(cls.known_keys())}), got {show(raw)}")
            return {}, False
        known = cls.known_keys()
        ok = True
        values: Dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                problems.append(unknown_key(path, key, known, (hints or {}).get(str(key), "")))
                ok = False
                continue
            meta = next(f.metadata for f in fields(cls) if f.name == key)
            if meta["type"] == "section":
                nested = meta["section"]
                if isinstance(value, bool) and "enabled" in nested.known_keys():
                    value = {"enabled": value}
                parsed = nested.parse(value, problems, f"{path}.{key}")
                if parsed is None:
                    ok = False
                else:
                    values[key] = parsed
                continue
            try:
                values[key] = coerce(value, meta)
            except KindError as exc:
                problems.append(f"{path}.{key}: {exc.message}")
                ok = False
        for spec_field in fields(cls):
            required = spec_field.default is MISSING and spec_field.default_factory is MISSING
            if "type" in spec_field.metadata and required and spec_field.name not in raw:
                problems.append(f"{path}.{spec_field.name}: required key is missing")
                ok = False
        return values, ok

    @classmethod
    def parse(cls, raw: Any, problems: List[str], path: Optional[str] = None,
              hints: Optional[Dict[str, str]] = None, **extra: Any):
        """The section read from YAML, or None when it has problems (all of them added to `problems`)."""
        values, ok = cls.read(raw, problems, path, hints)
        if not ok:
            # Report the value problems of the keys that were readable too, without cross-field checks.
            for spec_field in fields(cls):
                if spec_field.name in values and spec_field.metadata.get("type") != "section":
                    message = check(values[spec_field.name], spec_field.metadata)
                    if message:
                        problems.append(f"{path or cls.PATH}.{spec_field.name}: {message}")
            return None
        try:
            return cls(**values, **extra)
        except SpecError as exc:
            problems.extend(exc.problems)
            return None
