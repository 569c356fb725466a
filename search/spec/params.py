"""The method-dependent part of a spec: `peft:` (method and fixed method values) and `space:`.

Every parameter (spaces.methods) has one home section where it is fixed (`peft:`, `training:` or
`data:`), or is searched in `space:` - never both. `values()` merges fixed values, defaults and one
trial's sampled values into the final parameters, deriving ratios (lora_alpha = alpha_ratio * r).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from search.spec.fields import Section, SpecError, show, unknown_key
from spaces.kinds import Kind, KindError, RatioTo
from spaces.methods import TRAINING_PARAMS, Method, Param, get_method, method_names, params_for
from spaces.syntax import parse_kind


@dataclass(frozen=True)
class PeftSection(Section):
    """The PEFT method and the method parameters given in `peft:` (typed by the method's Params)."""

    PATH = "peft"
    method: str = "lora"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        params = get_method(self.method).params
        object.__setattr__(self, "params", {key: params[key].coerce(value) for key, value in self.params.items()})

    def field_problems(self) -> List[str]:
        if not isinstance(self.method, str) or self.method not in method_names():
            return [f"peft.method: unknown PEFT method {self.method!r}; known methods are: {', '.join(method_names())}"]
        return fixed_problems(self.method, "peft", self.params, get_method(self.method).params)


def fixed_problems(method: str, path: str, given: Mapping[str, Any], params: Mapping[str, Param]) -> List[str]:
    """Type and range problems of fixed values; unknown keys name the method's parameters."""
    problems = []
    for key, value in given.items():
        if key not in params:
            problems.append(unknown_key(path, key, list(params), _owner_hint(key, method)))
            continue
        try:
            value = params[key].coerce(value)
        except KindError as exc:
            problems.append(f"{path}.{key}: {exc.message}")
            continue
        message = params[key].check(value) if params[key].value_type in ("int", "float", "str") else None
        if message:
            problems.append(f"{path}.{key}: {message}")
    return problems


def _owner_hint(key: Any, method: str) -> str:
    owners = [name for name in method_names() if key in get_method(name).params]
    if owners:
        return f" ({key} is a parameter of {', '.join(owners)}, not of {method})"
    if key in TRAINING_PARAMS:
        home = TRAINING_PARAMS[key].home
        return f" ({key} belongs in {home}:, or in space: to search it)"
    return ""


def pair_problems(method: Method, peft_given: Mapping[str, Any], space: Mapping[str, Kind],
                  fixed: Mapping[str, Any]) -> List[str]:
    """Rules between parameters of one method (alpha given twice, prompt_init text needs its text)."""
    problems = []
    for ratio_key, (target, _other) in method.ratios.items():
        places = [f"peft.{key}" for key in (target, ratio_key) if peft_given.get(key) is not None]
        places += [f"space.{key}" for key in (target, ratio_key) if key in space]
        if len(places) > 1:
            problems.append(f"{places[1]}: give {target} or {ratio_key}, not both (also in {places[0]})")
    if "prompt_init" in method.params:
        init = space.get("prompt_init")
        choices = init.grid() if init is not None else [fixed.get("prompt_init", "random")]
        text = fixed.get("prompt_init_text")
        if "text" in choices and not text:
            where = "space.prompt_init" if init is not None else "peft.prompt_init"
            problems.append(f"{where}: prompt_init 'text' needs peft.prompt_init_text "
                            f"(the words the prompt starts from), got none")
        if text and "text" not in choices:
            problems.append(f"peft.prompt_init_text: is used only with prompt_init: text, got prompt_init {choices[0]!r}")
    if method.name == "ia3":
        for key in ("target_modules", "feedforward_modules"):
            if fixed.get(key) == "all-linear":
                problems.append(f"peft.{key}: 'all-linear' is for lora; ia3 needs 'auto' or a list")
    return problems


def parse_peft(raw: Any, problems: List[str]) -> Optional[PeftSection]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"peft: must be a mapping (method: lora, ...), got {show(raw)}")
        return None
    given = {key: value for key, value in raw.items() if key != "method"}
    try:
        return PeftSection(raw.get("method", "lora"), given)
    except SpecError as exc:
        problems.extend(exc.problems)
        return None


def parse_space(raw: Any, method: Optional[str], problems: List[str]) -> Optional[Dict[str, Kind]]:
    """Kinds of the searched parameters. `method` None (unknown) checks only training parameters."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"space: must be a mapping of parameter -> values, got {show(raw)}")
        return None
    params = params_for(method) if method else dict(TRAINING_PARAMS)
    ratios = get_method(method).ratios if method else {}
    space: Dict[str, Kind] = {}
    ok = True
    for key, value in raw.items():
        path = f"space.{key}"
        if key not in params and key not in ratios:
            if method is None and any(key in get_method(name).params for name in method_names()):
                continue  # the method is unknown (already reported), so its parameters cannot be checked
            problems.append(unknown_key("space", key, list(params), _owner_hint(key, method or "this method")))
            ok = False
            continue
        try:
            space[key] = parse_param_kind(key, value, params, ratios)
        except KindError as exc:
            problems.append(f"{path}{exc.subpath}: {exc.message}")
            ok = False
    return space if ok else None


def parse_param_kind(key: str, raw: Any, params: Mapping[str, Param], ratios: Mapping[str, Tuple[str, str]]) -> Kind:
    """One `space:` entry as a kind, checked against the parameter's type and bounds."""
    if key in ratios:  # alpha_ratio: [1, 2, 4]  ->  lora_alpha = alpha_ratio * r
        _target, other = ratios[key]
        ratio = parse_kind(raw, "float", coerce=params[key].coerce)
        _check_extremes(params[key], ratio)
        return RatioTo(other, ratio)
    param = params[key]
    if not param.searchable:
        raise KindError(f"cannot be searched; set it in {param.home}.{key}")
    if isinstance(raw, dict) and "ratio_to" in raw:
        kind = parse_kind(raw)
        if kind.other not in params or params[kind.other].value_type not in ("int", "float"):
            numeric = [name for name, p in params.items() if p.value_type in ("int", "float")]
            raise KindError(f"must name a numeric parameter ({', '.join(numeric)}), got {kind.other!r}", ".ratio_to")
        return kind
    if param.value_type not in ("int", "float") and isinstance(raw, dict) and "low" in raw:
        raise KindError(f"{param.what} takes a list of choices, not a range, got {raw!r}")
    kind = parse_kind(raw, param.value_type if param.value_type in ("int", "float") else None, coerce=param.coerce)
    _check_extremes(param, kind)
    return kind


def _check_extremes(param: Param, kind: Kind) -> None:
    for subpath, value in kind.extremes():
        value = param.coerce(value)
        message = param.check(value) if param.value_type in ("int", "float", "str") else None
        if message:
            raise KindError(message, subpath)


def conflict_problems(raw_sections: Mapping[str, Any], space: Mapping[str, Kind], method: Optional[str]) -> List[str]:
    """A key searched in `space:` and also fixed in its home section."""
    params = params_for(method) if method else dict(TRAINING_PARAMS)
    problems = []
    for key in space:
        home = params[key].home if key in params else "peft"
        section = raw_sections.get(home)
        if isinstance(section, dict) and key in section:
            problems.append(f"space.{key}: also fixed in {home}.{key}; give it in one place")
    return problems


def fixed_values(peft: PeftSection, training: Mapping[str, Any], max_length: int) -> Dict[str, Any]:
    """Every parameter's value when nothing is searched: given values, else defaults."""
    values = {name: param.default for name, param in get_method(peft.method).params.items()}
    values.update(peft.params)
    values.update(training)
    values["max_length"] = max_length
    return values


def display_name(key: str, kind: Kind) -> str:
    """The user-facing name of a searched entry (a ratio under `lora_alpha` shows as lora_alpha_ratio)."""
    if isinstance(kind, RatioTo) and not key.endswith("_ratio"):
        return f"{key}_ratio"
    return key


def merge_values(method_name: str, fixed: Mapping[str, Any], space: Mapping[str, Kind],
                 sampled: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(all final values, the user-facing searched and derived ones) for one trial.

    `sampled`: display name -> user-facing value of each searched entry (already decoded).
    """
    method = get_method(method_name)
    values = dict(fixed)
    shown: Dict[str, Any] = {}
    ratio_values: Dict[str, Tuple[float, str]] = {}
    for key, kind in space.items():
        value = sampled[display_name(key, kind)] if kind.searched else kind.decode(None)
        if kind.searched:
            shown[display_name(key, kind)] = value
        if isinstance(kind, RatioTo):
            ratio_values[key] = (value, kind.other)
        else:
            values[key] = value
    # ratios of the method (alpha_ratio -> lora_alpha = alpha_ratio * r) unless the target is given
    for ratio_key, (target, other) in method.ratios.items():
        if ratio_key in ratio_values:
            values[ratio_key] = ratio_values.pop(ratio_key)[0]
        if target in ratio_values or fixed.get(target) is not None or target in space:
            continue
        values[target] = RatioTo.derive(values[ratio_key], values[other])
        if ratio_key in space or other in space:
            shown[target] = values[target]
    for key, (ratio, other) in ratio_values.items():  # explicit `{ratio_to: other, ratio: ...}`
        values[key] = RatioTo.derive(ratio, values[other])
        shown[key] = values[key]
    for ratio_key in method.ratios:
        values.pop(ratio_key, None)  # not a PEFT argument
    return values, shown
