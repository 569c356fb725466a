"""`peft-search validate`: validate_file gives (spec, []) or (None, problems); every shipped example validates."""
from __future__ import annotations

import glob
import os

import pytest

from search.validate import validate_file
from test_spec_helpers import base_spec, merged, tiny_world, write_spec  # noqa: F401 (fixture)

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "*.yaml")))


def test_valid_file(tiny_world, tmp_path):
    spec, problems = validate_file(write_spec(tmp_path, base_spec(tiny_world)))
    assert problems == [] and spec.name == "unit-test"


def test_invalid_file_lists_every_problem(tiny_world, tmp_path):
    spec, problems = validate_file(write_spec(tmp_path, merged(base_spec(tiny_world), {
        "search.trials": 0, "search.concurrency": 0, "storage": "redis://localhost"})))
    assert spec is None
    assert sorted(problem.split(":")[0] for problem in problems) == ["search.concurrency", "search.trials", "storage"]


def test_malformed_yaml_is_a_problem_not_a_crash(tmp_path):
    spec, problems = validate_file(write_spec(tmp_path, None, text="model: [\n"))
    assert spec is None and len(problems) == 1 and "not valid YAML" in problems[0]


def test_examples_exist():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(path) for path in EXAMPLES])
def test_every_example_validates(path, monkeypatch):
    # Hub models that are not cached are checked when they download; offline that is a problem by design.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    data_dir = os.path.join(os.path.dirname(path), "data", "stdlib_docstrings")
    if not os.path.isfile(os.path.join(data_dir, "train.jsonl")):
        pytest.skip("examples/data/stdlib_docstrings is not built yet")
    spec, problems = validate_file(path)
    assert problems == []
    assert spec.search_space()
