"""Parameter kinds: how one parameter is searched, and how it maps to an Optuna distribution.

Every kind is a frozen dataclass that checks itself at construction (raising `KindError`, whose
message names the bad value and, through `.subpath`, the sub-key such as `.low`), and follows one
contract:

- `to_optuna()` gives the Optuna distribution the sampler sees;
- `optuna_name(param)` is the name the distribution is stored under (usually `param` itself);
- `decode(optuna_value)` turns a sampled value into the user-facing value;
- `encode(user_value)` is the inverse (for enqueued trials), None when the value is not in the space;
- `extremes()` lists the user-facing values that bound the space, for range checks of the parameter;
- `grid()` lists every user-facing value of a finite space, None for a continuous one;
- `to_yaml()` writes the kind back in the spec's YAML syntax.

YAML syntax (`spaces.syntax.parse_kind`): a list is categorical, `{low, high, log?, step?}` an int or float range
(by the parameter's type, or by the values' types), `{power_of_two: [1, 64]}` powers of two,
`{ratio_to: r, ratio: <kind>}` a ratio to another parameter, any scalar a fixed value.

Optuna is imported inside `to_optuna`, so building and checking kinds stays cheap.
"""
from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple


class KindError(ValueError):
    """A kind that cannot be built; `subpath` (e.g. ".low") is appended to the parameter's key path."""

    def __init__(self, message: str, subpath: str = ""):
        super().__init__(message)
        self.message = message
        self.subpath = subpath


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A value as the user wrote it, with its type when that is the problem."""
    if isinstance(value, str):
        return f"{value!r} (str)"
    if isinstance(value, bool):
        return f"{value} (bool)"
    return repr(value)


class Kind(abc.ABC):
    """Base of all kinds. Subclasses are frozen dataclasses that validate in `__post_init__`."""

    name: ClassVar[str]          # registry name, also the explicit YAML key where there is one
    searched: ClassVar[bool] = True

    @abc.abstractmethod
    def to_optuna(self):  # -> optuna.distributions.BaseDistribution
        ...

    def optuna_name(self, param: str) -> str:
        return param

    def decode(self, optuna_value: Any) -> Any:
        return optuna_value

    def encode(self, user_value: Any) -> Any:
        """The Optuna value for `user_value`, or None when the value is outside the space."""
        return user_value if self._contains(user_value) else None

    @abc.abstractmethod
    def extremes(self) -> List[Tuple[str, Any]]:
        """(subpath, user value) pairs bounding the space, e.g. [(".low", 1), (".high", 64)]."""

    @abc.abstractmethod
    def grid(self) -> Optional[List[Any]]:
        ...

    @abc.abstractmethod
    def to_yaml(self) -> Any:
        ...

    def _contains(self, user_value: Any) -> bool:
        grid = self.grid()
        return grid is not None and user_value in grid


@dataclass(frozen=True)
class Int(Kind):
    """Integers in [low, high] (both included), every `step`-th one, or log-uniform with `log`."""

    low: int
    high: int
    step: int = 1
    log: bool = False
    name: ClassVar[str] = "int"

    def __post_init__(self):
        for key in ("low", "high", "step"):
            if not _is_int(getattr(self, key)):
                raise KindError(f"must be an integer, got {_show(getattr(self, key))}", f".{key}")
        if not isinstance(self.log, bool):
            raise KindError(f"must be true or false, got {_show(self.log)}", ".log")
        if self.low >= self.high:
            raise KindError(f"`low < high` must hold (a single value is written as a scalar), "
                            f"got low={self.low}, high={self.high}")
        if self.step < 1:
            raise KindError(f"must be >= 1, got {self.step}", ".step")
        if self.log and self.low < 1:
            raise KindError(f"a log range needs low >= 1, got {self.low}", ".low")
        if self.log and self.step != 1:
            raise KindError(f"a log range cannot have a step, got {self.step}", ".step")
        if (self.high - self.low) % self.step:
            # Optuna would silently lower `high`; say so instead.
            raise KindError(f"high - low must be a multiple of step {self.step}, got low={self.low}, high={self.high}")

    def to_optuna(self):
        from optuna.distributions import IntDistribution
        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def decode(self, optuna_value: Any) -> int:
        return int(optuna_value)

    def _contains(self, user_value: Any) -> bool:
        return _is_int(user_value) and self.low <= user_value <= self.high and (user_value - self.low) % self.step == 0

    def extremes(self):
        return [(".low", self.low), (".high", self.high)]

    def grid(self):
        return list(range(self.low, self.high + 1, self.step))

    def to_yaml(self):
        out: Dict[str, Any] = {"low": self.low, "high": self.high}
        if self.step != 1:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        return out


@dataclass(frozen=True)
class Float(Kind):
    """Reals in [low, high], uniform or log-uniform (`log`), optionally on a `step` grid."""

    low: float
    high: float
    log: bool = False
    step: Optional[float] = None
    name: ClassVar[str] = "float"

    def __post_init__(self):
        for key in ("low", "high") + (("step",) if self.step is not None else ()):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value):
                raise KindError(f"must be a finite number, got {_show(value)}", f".{key}")
        if not isinstance(self.log, bool):
            raise KindError(f"must be true or false, got {_show(self.log)}", ".log")
        if self.low >= self.high:
            raise KindError(f"`low < high` must hold (a single value is written as a scalar), "
                            f"got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise KindError(f"a log range needs low > 0, got {self.low}", ".low")
        if self.step is not None:
            if self.log:
                raise KindError(f"a log range cannot have a step, got {self.step}", ".step")
            if self.step <= 0:
                raise KindError(f"must be > 0, got {self.step}", ".step")

    def to_optuna(self):
        from optuna.distributions import FloatDistribution
        return FloatDistribution(float(self.low), float(self.high), log=self.log,
                                 step=None if self.step is None else float(self.step))

    def decode(self, optuna_value: Any) -> float:
        return float(optuna_value)

    def _contains(self, user_value: Any) -> bool:
        return _is_number(user_value) and self.low <= user_value <= self.high

    def extremes(self):
        return [(".low", self.low), (".high", self.high)]

    def grid(self):
        if self.step is None:
            return None
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + index * self.step, 12) for index in range(count)]

    def to_yaml(self):
        out: Dict[str, Any] = {"low": float(self.low), "high": float(self.high)}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = float(self.step)
        return out


def _encode_choice(choice: Any) -> Any:
    """Optuna stores None/bool/int/float/str choices; a list (a module set) is stored joined by commas."""
    if isinstance(choice, (list, tuple)):
        return ",".join(str(item) for item in choice)
    return choice


@dataclass(frozen=True)
class Categorical(Kind):
    """One of `choices` (unordered for TPE; use Int or PowerOfTwo when the order matters).

    Choices are None, bool, int, float, str, or tuples of str (e.g. target-module sets, stored
    in Optuna as "query,value").
    """

    choices: Tuple[Any, ...]
    name: ClassVar[str] = "categorical"

    def __post_init__(self):
        if not isinstance(self.choices, tuple):
            object.__setattr__(self, "choices", tuple(self.choices))
        if not self.choices:
            raise KindError("an empty list has nothing to choose from; give at least one value")
        for choice in self.choices:
            ok = choice is None or isinstance(choice, (bool, numbers.Real, str)) or (
                isinstance(choice, tuple) and all(isinstance(item, str) for item in choice))
            if not ok:
                raise KindError(f"choices must be numbers, strings, booleans or lists of strings, got {choice!r}")
        encoded = [_encode_choice(choice) for choice in self.choices]
        duplicates = sorted({str(value) for value in encoded if encoded.count(value) > 1})
        if duplicates:
            raise KindError(f"choices must be distinct, got {', '.join(duplicates)} more than once")

    def to_optuna(self):
        from optuna.distributions import CategoricalDistribution
        return CategoricalDistribution([_encode_choice(choice) for choice in self.choices])

    def decode(self, optuna_value: Any) -> Any:
        for choice in self.choices:
            if _encode_choice(choice) == optuna_value and type(_encode_choice(choice)) is type(optuna_value):
                return list(choice) if isinstance(choice, tuple) else choice
        for choice in self.choices:  # 1 == 1.0: Optuna may hand back an int for a float choice
            if _encode_choice(choice) == optuna_value:
                return list(choice) if isinstance(choice, tuple) else choice
        raise ValueError(f"{optuna_value!r} is not one of the choices {list(self.choices)}")

    def encode(self, user_value: Any) -> Any:
        key = _encode_choice(user_value)
        for choice in self.choices:
            if _encode_choice(choice) == key and isinstance(key, bool) == isinstance(choice, bool):
                return _encode_choice(choice)
        return None

    def extremes(self):
        return [("", list(choice) if isinstance(choice, tuple) else choice) for choice in self.choices]

    def grid(self):
        return [list(choice) if isinstance(choice, tuple) else choice for choice in self.choices]

    def to_yaml(self):
        return [list(choice) if isinstance(choice, tuple) else choice for choice in self.choices]


@dataclass(frozen=True)
class PowerOfTwo(Kind):
    """Powers of two in [low, high] (e.g. LoRA ranks 1..64), searched as an ordered integer exponent.

    The Optuna distribution is an IntDistribution over log2 of the value, stored as `<param>_log2`,
    so that TPE sees 8 as lying between 4 and 16 (a categorical would not).
    """

    low: int
    high: int
    name: ClassVar[str] = "power_of_two"

    def __post_init__(self):
        for key in ("low", "high"):
            value = getattr(self, key)
            if not _is_int(value):
                raise KindError(f"must be an integer, got {_show(value)}", f".{key}")
            if value < 1 or value & (value - 1):
                raise KindError(f"must be a power of two (1, 2, 4, ...), got {value}", f".{key}")
        if self.low >= self.high:
            raise KindError(f"`low < high` must hold, got low={self.low}, high={self.high}")

    def optuna_name(self, param: str) -> str:
        return f"{param}_log2"

    def to_optuna(self):
        from optuna.distributions import IntDistribution
        return IntDistribution(self.low.bit_length() - 1, self.high.bit_length() - 1)

    def decode(self, optuna_value: Any) -> int:
        return 2 ** int(optuna_value)

    def encode(self, user_value: Any) -> Any:
        return user_value.bit_length() - 1 if self._contains(user_value) else None

    def extremes(self):
        return [(".low", self.low), (".high", self.high)]

    def grid(self):
        return [2 ** exponent for exponent in range(self.low.bit_length() - 1, self.high.bit_length())]

    def to_yaml(self):
        return {"power_of_two": [self.low, self.high]}


@dataclass(frozen=True)
class Fixed(Kind):
    """One value, not searched (a scalar in `space:` is the same as giving it in `training:`)."""

    value: Any
    name: ClassVar[str] = "fixed"
    searched: ClassVar[bool] = False

    def to_optuna(self):
        from optuna.distributions import CategoricalDistribution
        return CategoricalDistribution([_encode_choice(self.value)])

    def decode(self, optuna_value: Any) -> Any:
        return self.value

    def encode(self, user_value: Any) -> Any:
        return _encode_choice(self.value) if user_value == self.value else None

    def extremes(self):
        return [("", self.value)]

    def grid(self):
        return [self.value]

    def to_yaml(self):
        if isinstance(self.value, (list, tuple, dict)):
            return {"fixed": list(self.value) if isinstance(self.value, tuple) else self.value}
        return self.value


@dataclass(frozen=True)
class RatioTo(Kind):
    """A parameter derived as `ratio * other` (e.g. lora_alpha = alpha_ratio * r); the ratio is searched.

    `ratio` is a numeric kind (Float, Int, PowerOfTwo, Categorical of numbers, Fixed); its Optuna
    name is `<target>_ratio`, except for the `alpha_ratio` spelling, which keeps its own name.
    """

    other: str
    ratio: Kind
    name: ClassVar[str] = "ratio_to"

    def __post_init__(self):
        if not isinstance(self.other, str) or not self.other:
            raise KindError(f"must name another parameter, got {_show(self.other)}", ".ratio_to")
        if isinstance(self.ratio, RatioTo) or not isinstance(self.ratio, Kind):
            raise KindError(f"must be a range, list or number, got {self.ratio!r}", ".ratio")
        for subpath, value in self.ratio.extremes():
            if not _is_number(value):
                raise KindError(f"ratios must be numbers, got {_show(value)}", ".ratio" + subpath)
            if value <= 0:
                raise KindError(f"ratios must be > 0, got {value}", ".ratio" + subpath)

    @property
    def searched(self) -> bool:  # type: ignore[override]
        return self.ratio.searched

    def optuna_name(self, param: str) -> str:
        return self.ratio.optuna_name(param if param.endswith("_ratio") else f"{param}_ratio")

    def to_optuna(self):
        return self.ratio.to_optuna()

    def decode(self, optuna_value: Any) -> Any:
        """The ratio (user-facing); `derive` gives the parameter's value."""
        return self.ratio.decode(optuna_value)

    def encode(self, user_value: Any) -> Any:
        return self.ratio.encode(user_value)

    @staticmethod
    def derive(ratio: float, other_value: float):
        value = ratio * other_value
        return int(value) if float(value).is_integer() else float(value)

    def extremes(self):
        return [(".ratio" + subpath, value) for subpath, value in self.ratio.extremes()]

    def grid(self):
        return self.ratio.grid()

    def to_yaml(self):
        return {"ratio_to": self.other, "ratio": self.ratio.to_yaml()}


# name -> kind class (the registry); spaces.syntax.parse_kind picks among them by YAML shape.
KINDS: Dict[str, type] = {kind.name: kind for kind in (Int, Float, Categorical, PowerOfTwo, RatioTo, Fixed)}
