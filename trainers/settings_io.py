"""TrialSettings <-> plain dicts (JSON), for the recipe's CLI and for writing what a trial ran with.

Every problem is collected (unknown keys named with the known ones, missing required keys), so one
run of the CLI shows all that is wrong with a settings file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping

from trainers.settings import (DataSettings, EngineSettings, GenerationSettings, ModelSettings, PeftSettings,
                               TrainingSettings, TrialSettings)

# TrialSettings field -> the dataclass of that section
SECTIONS = {"model": ModelSettings, "data": DataSettings, "peft": PeftSettings,
            "training": TrainingSettings, "engine": EngineSettings, "generation": GenerationSettings}


class SettingsError(ValueError):
    """Settings that do not match the dataclasses; one line per problem, each naming its key path."""

    def __init__(self, problems: List[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _section(name: str, cls, values: Any, problems: List[str]):
    if not isinstance(values, Mapping):
        problems.append(f"{name}: must be a mapping, got {type(values).__name__}")
        return None
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in sorted(set(values) - set(fields)):
        problems.append(f"{name}.{key}: unknown key; known: {', '.join(fields)}")
    required = [key for key, field in fields.items()
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in values:
            problems.append(f"{name}.{key}: required")
    if any(problem.startswith(f"{name}.") for problem in problems):
        return None
    return cls(**{key: value for key, value in values.items() if key in fields})


def settings_from_dict(values: Mapping[str, Any]) -> TrialSettings:
    """A TrialSettings from {"model": {...}, "data": {...}, "peft": {...}, "training": {...}, "engine": {...},
    "generation": {...}}."""
    problems: List[str] = []
    if not isinstance(values, Mapping):
        raise SettingsError([f"settings: must be a mapping, got {type(values).__name__}"])
    for key in sorted(set(values) - set(SECTIONS)):
        problems.append(f"{key}: unknown section; known: {', '.join(SECTIONS)}")
    for key in ("model", "data"):
        if key not in values:
            problems.append(f"{key}: required")
    built = {name: _section(name, cls, values[name], problems) for name, cls in SECTIONS.items() if name in values}
    if problems:
        raise SettingsError(problems)
    return TrialSettings(**built)


def settings_to_dict(settings: TrialSettings) -> Dict[str, Any]:
    """Plain dicts and lists (JSON-ready); read-only mappings such as PeftSettings.params become dicts."""
    def plain(value):
        if isinstance(value, Mapping):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return {name: {field.name: plain(getattr(getattr(settings, name), field.name))
                   for field in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
