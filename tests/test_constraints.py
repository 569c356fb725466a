"""constraints.txt (the versions the suite passed with) covers every dependency and agrees with pyproject's ranges."""
from __future__ import annotations

import os
import sys

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, ".ci"))
from upgrade_constraints import LOCK, _normal, read_lock  # noqa: E402

tomllib = pytest.importorskip("tomllib")


def _requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    listed = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        listed += extra
    return [Requirement(text) for text in listed if not text.startswith(project["name"])]


def test_every_dependency_is_pinned_within_its_range():
    pins = read_lock(LOCK)
    for requirement in _requirements():
        name = _normal(requirement.name)
        if name == "torch":
            continue   # the install command names the CPU build (a bare torch pulls a CUDA one)
        assert name in pins, f"{requirement.name} is not in constraints.txt: run .ci/upgrade_constraints.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"


def test_the_lock_is_read_as_pip_reads_it(tmp_path):
    (tmp_path / "lock.txt").write_text("# comment\nPyYAML==6.0.4\ntyping_extensions==4.15.0  # why\n\n")
    assert read_lock(str(tmp_path / "lock.txt")) == {"pyyaml": "6.0.4", "typing-extensions": "4.15.0"}


def test_ci_and_the_readme_install_with_the_lock():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "-c constraints.txt" in readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "-c constraints.txt" in ci
