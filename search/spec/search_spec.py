"""The search spec (INTERFACE.md): `load_spec(path)` -> a validated, frozen `SearchSpec`.

Every problem of a spec is collected and reported at once, one line each, starting with its key
path (`space.r: rank must be >= 1, got 0`). The spec then answers what the search needs:
the Optuna search space, the user-facing values of a trial (trials.csv's param_* columns), and the
`TrialSettings` a trainer runs.

Sections live in search/spec/sections.py, `peft:` and `space:` in search/spec/params.py, checks
against files and the model in search/spec/checks.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping

from search.spec.fields import SpecError, show, unknown_key
from search.spec.params import PeftSection, display_name, fixed_values, merge_values
from search.spec.sections import (DataSection, GenerationSection, ModelSection, ObjectiveSection, ResourcesSection,
                                  SearchSection, TrackingSection, TrainingSection, redact_url)
from search.store.storage import is_secret_key
from spaces.kinds import Kind
from spaces.methods import get_method, params_for
from trainers.records import is_local_source

__all__ = ["SearchSpec", "SpecError", "load_spec", "parse_spec"]

TOP_LEVEL_KEYS = ("name", "model", "data", "peft", "space", "training", "objective", "search",
                  "generation", "resources", "storage", "tracking")


@dataclass(frozen=True)
class SearchSpec:
    """A whole spec, checked at construction (cross-section rules; files and model in `load_spec`)."""

    name: str
    model: ModelSection
    data: DataSection
    peft: PeftSection = field(default_factory=PeftSection)
    space: Mapping[str, Kind] = field(default_factory=dict)
    training: TrainingSection = field(default_factory=TrainingSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    search: SearchSection = field(default_factory=SearchSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    storage: str = field(default="sqlite", repr=False)   # a database URL holds its password
    tracking: TrackingSection = field(default_factory=TrackingSection)
    # what inspect_model found (None when the model was not inspected); not part of the spec's identity
    model_shape: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        from search.spec.rules import spec_problems
        problems = spec_problems(self)
        if problems:
            raise SpecError(problems)

    # --- what the search needs -------------------------------------------------------------------
    def search_space(self) -> Dict[str, Any]:
        """Optuna name -> distribution of every searched parameter (e.g. {"r_log2": IntDistribution(0, 6)})."""
        return {kind.optuna_name(key): kind.to_optuna() for key, kind in self.space.items() if kind.searched}

    def param_names(self) -> List[str]:
        """The user-facing names `decode` gives, in order (trials.csv's param_* columns)."""
        return list(self.decode(self.default_params(complete=True)))

    def decode(self, optuna_params: Mapping[str, Any]) -> Dict[str, Any]:
        """User-facing name -> value of the searched parameters and those derived from them (lora_alpha)."""
        return self._values(optuna_params)[1]

    def trial_settings(self, optuna_params: Mapping[str, Any]):
        """The trainers.settings.TrialSettings of one trial: fixed values with the sampled ones merged in.

        An empty mapping gives the settings at `default_params(complete=True)` (for what does not
        depend on the sampled values, such as the data settings)."""
        from search.spec.rules import build_trial_settings
        return build_trial_settings(self, self._values(optuna_params)[0])

    def _values(self, optuna_params: Mapping[str, Any]):
        if not optuna_params:
            optuna_params = self.default_params(complete=True)
        sampled = {}
        for key, kind in self.space.items():
            if not kind.searched:
                continue
            name = kind.optuna_name(key)
            if name not in optuna_params:
                raise KeyError(f"no sampled value for {name!r}; the search space has: {', '.join(self.search_space())}")
            sampled[display_name(key, kind)] = kind.decode(optuna_params[name])
        fixed = fixed_values(self.peft, {f.name: getattr(self.training, f.name) for f in fields(self.training)},
                             self.data.max_length)
        return merge_values(self.peft.method, fixed, self.space, sampled)

    def default_params(self, complete: bool = False) -> Dict[str, Any]:
        """Optuna values of the published defaults (rank 8, alpha 2r, lr 2e-4, ...) that lie in the space,
        for enqueueing as the first trial. `complete`: fill the others with a value of the space."""
        method = get_method(self.peft.method)
        defaults = {name: param.default for name, param in params_for(self.peft.method).items()}
        for ratio_key, (target, _other) in method.ratios.items():
            defaults[target] = defaults[ratio_key]  # a `{ratio_to: ...}` entry under the target's name
        out = {}
        for key, kind in self.space.items():
            if not kind.searched:
                continue
            encoded = kind.encode(defaults[key]) if defaults.get(key) is not None else None
            if encoded is None and complete:
                grid = kind.grid()
                encoded = kind.encode(grid[0]) if grid else kind.to_optuna().low
            if encoded is not None:
                out[kind.optuna_name(key)] = encoded
        return out

    def grid(self) -> Dict[str, List[Any]]:
        """Optuna name -> every Optuna value, for algorithm: grid (only finite spaces validate for it)."""
        return {kind.optuna_name(key): [kind.encode(value) for value in kind.grid()]
                for key, kind in self.space.items() if kind.searched}

    @property
    def max_rounds(self) -> int:
        """Eval rounds of the longest trial: epochs (the most, when searched) * search.evals_per_epoch."""
        epochs = self.training.epochs
        if "epochs" in self.space:
            epochs = max(value for _subpath, value in self.space["epochs"].extremes())
        return int(epochs) * self.search.evals_per_epoch

    # --- writing it back --------------------------------------------------------------------------
    def to_dict(self, redact: bool = True) -> Dict[str, Any]:
        """The resolved spec as YAML-ready data (loads back to an equal spec); secrets `***` if `redact`."""
        from search.spec.rules import spec_to_dict
        data = spec_to_dict(self)
        return _redact(data) if redact else data


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if isinstance(value, str):
        if is_secret_key(key):
            return "***"
        return redact_url(value)
    return value


# --- loading ---------------------------------------------------------------------------------------
def load_spec(path: str, check_files: bool = True, check_model: bool = True) -> SearchSpec:
    """Read, check and return the spec at `path`; SpecError listing every problem otherwise.

    `check_files`: data files exist, have rows and fields; the storage location and driver exist.
    `check_model`: the model reference resolves (alias, local directory, HF cache) and its layers fit
    the spec (target modules exist, rank <= layer sizes, virtual tokens fit the positions).
    Relative paths (data files, model directory) are read from the spec file's directory.
    """
    from search.spec.yaml_file import read_spec_yaml

    raw = read_spec_yaml(path)   # safe constructors; duplicate keys and alias bombs refused
    return parse_spec(raw, base_dir=os.path.dirname(os.path.abspath(path)),
                      check_files=check_files, check_model=check_model)


def _resolve_path(value: Any, base_dir: str) -> Any:
    """A relative local path, read from the spec's directory (or the working directory, where it exists)."""
    if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value) if isinstance(value, str) else value
    beside_spec = os.path.normpath(os.path.join(base_dir, value))
    if os.path.exists(beside_spec) or not os.path.exists(value):
        return beside_spec
    return os.path.abspath(value)


def _is_local_data(value: Any, base_dir: str) -> bool:
    """A data source naming a local path rather than an HF dataset id: a data file suffix, a path form, or
    something that exists beside the spec (so `train: mydata` beside the spec is not looked up on the hub)."""
    return isinstance(value, str) and bool(value) and (
        is_local_source(value) or value.startswith((".", "~", "/")) or os.path.exists(os.path.join(base_dir, value)))


def _resolve_paths(raw: Dict[str, Any], base_dir: str) -> None:
    from trainers.records import is_template_text

    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            if _is_local_data(data.get(key), base_dir):
                data[key] = _resolve_path(data[key], base_dir)
        template = data.get("chat_template")   # a file of it, not the template itself
        if isinstance(template, str) and template.strip() and not is_template_text(template):
            data["chat_template"] = _resolve_path(template, base_dir)
    resources = raw.get("resources")   # a copy (parse_spec), so the caller's mapping stays as it was
    deepspeed = resources.get("deepspeed") if isinstance(resources, dict) else None
    if isinstance(deepspeed, dict) and isinstance(deepspeed.get("config"), str):
        resources["deepspeed"] = {**deepspeed, "config": _resolve_path(deepspeed["config"], base_dir)}
    storage_path = resources.get("storage_path") if isinstance(resources, dict) else None
    if isinstance(storage_path, str) and storage_path.strip() and "://" not in storage_path:
        resources["storage_path"] = _resolve_path(storage_path, base_dir)   # a directory, not a URL
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        from trainers.hub import MODEL_ALIASES, looks_like_local_path
        reference = model["name_or_path"]
        if reference not in MODEL_ALIASES and (looks_like_local_path(reference)
                                               or os.path.isdir(os.path.join(base_dir, reference))):
            model["name_or_path"] = _resolve_path(reference, base_dir)


def _home_hint(key: Any) -> str:
    """For a parameter written at the top level: where it belongs."""
    from spaces.methods import TRAINING_PARAMS, method_names

    if key in TRAINING_PARAMS:
        return f" ({key} belongs in {TRAINING_PARAMS[key].home}:, or in space: to search it)"
    if any(key in get_method(name).params for name in method_names()):
        return f" ({key} belongs in peft:, or in space: to search it)"
    return ""


def parse_spec(raw: Any, base_dir: str = ".", check_files: bool = True, check_model: bool = True) -> SearchSpec:
    """A SearchSpec from already-parsed YAML data (see `load_spec`)."""
    from search.spec.rules import file_and_model_problems, parse_sections

    if not isinstance(raw, dict):
        raise SpecError([f"spec: must be a mapping of sections ({', '.join(TOP_LEVEL_KEYS)}), got {show(raw)}"])
    raw = {key: (dict(value) if isinstance(value, dict) else value) for key, value in raw.items()}
    _resolve_paths(raw, base_dir)
    problems: List[str] = []
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            problems.append(unknown_key("", key, TOP_LEVEL_KEYS, _home_hint(key)))
    parts = parse_sections(raw, problems)
    shape, more = file_and_model_problems(parts, check_files=check_files, check_model=check_model)
    problems += more
    if problems:
        raise SpecError(problems)
    return SearchSpec(**parts, model_shape=shape)
