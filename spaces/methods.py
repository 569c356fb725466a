"""Which parameters each PEFT method has, plus the training parameters every method shares.

Defaults follow published practice (LoRA paper and the PEFT / QLoRA recipes): rank 8, alpha = 2r,
dropout 0.05, learning rate 2e-4, warmup 5% (3-6% is common). Any parameter may be fixed (in its
home section: `peft:`, `training:` or `data:`) or searched (in `space:`).

Methods are looked up through a small registry of factories (`register_method` / `get_method`),
so a new PEFT method is one function and one line here, and nothing is built before it is asked for.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from spaces.kinds import KindError

# Value types of parameters. "modules" is "auto" (the per-architecture preset), "all-linear"
# (LoRA only, PEFT's own choice) or a list of module names.
VALUE_TYPES = ("int", "float", "bool", "str", "modules")
MODULE_KEYWORDS = ("auto", "all-linear")


@dataclass(frozen=True)
class Param:
    """One parameter: its type, default and the range of values that make sense."""

    name: str
    value_type: str
    default: Any
    what: str                            # how messages call it: "rank must be >= 1, got 0"
    home: str = "training"               # the section that holds it when it is fixed
    low: Optional[float] = None
    low_open: bool = False               # True: `> low` instead of `>= low`
    high: Optional[float] = None
    high_open: bool = False              # True: `< high` instead of `<= high`
    choices: Optional[Tuple[str, ...]] = None
    searchable: bool = True
    optional: bool = False               # None is a valid value (e.g. max_steps: no cap)

    def __post_init__(self):
        if self.value_type not in VALUE_TYPES:
            raise ValueError(f"Param {self.name}: value_type must be one of {VALUE_TYPES}, got {self.value_type!r}")

    def coerce(self, value: Any) -> Any:
        """The value in this parameter's type, or KindError saying what is wrong with it."""
        if value is None and self.optional:
            return None
        kind = self.value_type
        if kind == "int":
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise KindError(f"{self.what} must be an integer, got {_show(value)}")
            return int(value)
        if kind == "float":
            if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise KindError(f"{self.what} must be a number, got {_show(value)}")
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise KindError(f"{self.what} must be true or false, got {_show(value)}")
            return value
        if kind == "str":
            if not isinstance(value, str):
                raise KindError(f"{self.what} must be a string, got {_show(value)}")
            return value
        # modules
        if isinstance(value, str):
            if value in MODULE_KEYWORDS:
                return value
            return (value,)
        if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) and item for item in value):
            return tuple(value)
        raise KindError(f"{self.what} must be 'auto' or a non-empty list of module names, got {value!r}")

    def check(self, value: Any) -> Optional[str]:
        """What is wrong with a value of the right type, or None."""
        if value is None:
            return None
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"{self.what} must be {'>' if self.low_open else '>='} {_num(self.low)}, got {value}"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"{self.what} must be {'<' if self.high_open else '<='} {_num(self.high)}, got {value}"
        if self.choices is not None and value not in self.choices:
            return f"{self.what} must be one of {', '.join(self.choices)}, got {value!r}"
        return None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _show(value: Any) -> str:
    return f"{value!r} (str)" if isinstance(value, str) else repr(value)


@dataclass(frozen=True)
class Method:
    """A PEFT method: its parameters (PEFT's names) and derived ones (`ratios`: ratio -> (target, of))."""

    name: str
    params: Mapping[str, Param]
    # alpha_ratio -> ("lora_alpha", "r"): lora_alpha = alpha_ratio * r, unless lora_alpha is given
    ratios: Mapping[str, Tuple[str, str]] = field(default_factory=dict)
    has_target_modules: bool = False


def _lora() -> Method:
    params = [
        Param("r", "int", 8, "rank", home="peft", low=1),  # higher: more capacity and memory
        Param("lora_alpha", "float", None, "lora_alpha", home="peft", low=0, low_open=True, optional=True),
        Param("alpha_ratio", "float", 2.0, "alpha_ratio", home="peft", low=0, low_open=True),  # alpha = 2r
        Param("lora_dropout", "float", 0.05, "dropout", home="peft", low=0, high=1, high_open=True),
        Param("target_modules", "modules", "auto", "target_modules", home="peft"),
        Param("use_rslora", "bool", False, "use_rslora", home="peft"),   # alpha/sqrt(r) scaling: helps high ranks
        Param("use_dora", "bool", False, "use_dora", home="peft"),
    ]
    return Method("lora", {p.name: p for p in params}, ratios={"alpha_ratio": ("lora_alpha", "r")},
                  has_target_modules=True)


def _virtual_tokens() -> Param:
    # 20 tokens: Lester et al. found little gain past 20 for prompt tuning
    return Param("num_virtual_tokens", "int", 20, "num_virtual_tokens", home="peft", low=1)


def _prompt_tuning() -> Method:
    params = [
        _virtual_tokens(),
        Param("prompt_init", "str", "random", "prompt_init", home="peft", choices=("random", "sample-vocab", "text")),
        Param("prompt_init_text", "str", None, "prompt_init_text", home="peft", optional=True, searchable=False),
    ]
    return Method("prompt-tuning", {p.name: p for p in params})


def _prefix_tuning() -> Method:
    return Method("prefix-tuning", {"num_virtual_tokens": _virtual_tokens()})


def _ia3() -> Method:
    params = [
        Param("target_modules", "modules", "auto", "target_modules", home="peft"),
        Param("feedforward_modules", "modules", "auto", "feedforward_modules", home="peft"),
    ]
    return Method("ia3", {p.name: p for p in params}, has_target_modules=True)


_FACTORIES: Dict[str, Callable[[], Method]] = {
    "lora": _lora,
    "prompt-tuning": _prompt_tuning,
    "prefix-tuning": _prefix_tuning,
    "ia3": _ia3,
}
_BUILT: Dict[str, Method] = {}


def register_method(name: str, factory: Callable[[], Method]) -> None:
    """Add a PEFT method; `factory` is called once, the first time the method is asked for."""
    _FACTORIES[name] = factory
    _BUILT.pop(name, None)


def method_names() -> Tuple[str, ...]:
    return tuple(_FACTORIES)


def get_method(name: str) -> Method:
    """The method called `name`; KeyError listing the known ones otherwise."""
    if name not in _BUILT:
        if name not in _FACTORIES:
            raise KeyError(f"unknown PEFT method {name!r}; known methods are: {', '.join(_FACTORIES)}")
        _BUILT[name] = _FACTORIES[name]()
    return _BUILT[name]


# Training parameters shared by all methods (names as in trainers.settings.TrainingSettings).
TRAINING_PARAMS: Mapping[str, Param] = {p.name: p for p in (
    Param("learning_rate", "float", 2e-4, "learning rate", low=0, low_open=True),   # LoRA: 2e-4..5e-4
    Param("epochs", "int", 3, "epochs", low=1),
    Param("batch_size", "int", 16, "batch size", low=1),
    Param("gradient_accumulation_steps", "int", 1, "gradient_accumulation_steps", low=1),
    Param("warmup_ratio", "float", 0.05, "warmup_ratio", low=0, high=1, high_open=True),  # 3-6% is common
    Param("weight_decay", "float", 0.01, "weight_decay", low=0),
    Param("max_grad_norm", "float", 1.0, "max_grad_norm", low=0, low_open=True),
    Param("max_steps", "int", None, "max_steps", low=1, optional=True, searchable=False),  # cap for tests
    # lives in `data:` (INTERFACE.md) but may be searched like a training parameter
    Param("max_length", "int", 128, "max_length", home="data", low=1),
)}


def params_for(method: str) -> Dict[str, Param]:
    """All parameters a spec with this method may fix or search: the method's, then training's."""
    return {**get_method(method).params, **TRAINING_PARAMS}
