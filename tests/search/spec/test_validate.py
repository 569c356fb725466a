"""`peft-search validate`: validate_file gives (spec, []) or (None, problems); every shipped example validates."""
from __future__ import annotations

import glob
import os

import pytest
from test_spec_helpers import DELETE, base_spec, merged, tiny_world, write_spec  # noqa: F401 (fixture)

from search.spec.validate import validate_file

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "*.yaml")))


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
    # embedded=False: the GPUs an example asks for (qlora_causal: one) are checked on the machine it runs on
    spec, problems = validate_file(path, embedded=False)
    assert problems == []
    assert spec.search_space()


@pytest.mark.parametrize("workers, gpus, here, expected", [
    (1, 0, 0, None),                                   # CPU trials need nothing of the machine
    (1, 1, 0, "1 GPU per worker asked for, but this machine has no GPU (embedded Ray); set 0, or run on a "
              "cluster with --address"),
    (1, 0.5, 0, "0.5 GPU per worker asked for, but this machine has no GPU"),
    (2, 1, 1, "a trial needs 2 GPUs (workers_per_trial=2 x gpus_per_worker=1), but this machine has 1"),
    (1, 0.5, 1, None),                                 # a fraction shares the one device
    (2, 1, 2, None),
    (3, 2, 8, None),
], ids=["cpu", "none-here", "fraction-none-here", "too-few", "fraction-shares", "enough", "plenty"])
def test_embedded_gpu_check(workers, gpus, here, expected):
    from search.spec.checks import embedded_gpu_problems
    from search.spec.sections import ResourcesSection

    problems = embedded_gpu_problems(ResourcesSection(workers_per_trial=workers, gpus_per_worker=gpus), gpus_here=here)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith("resources.gpus_per_worker: ") and expected in problems[0]


def test_gpu_check_applies_to_embedded_runs_only(tiny_world, tmp_path, monkeypatch):
    import search.spec.checks

    monkeypatch.setattr(search.spec.checks, "local_gpu_count", lambda: 0)   # whatever this machine has
    path = write_spec(tmp_path, merged(base_spec(tiny_world), {"resources.gpus_per_worker": 1}))
    spec, problems = validate_file(path)
    assert spec is None and len(problems) == 1 and "(embedded Ray)" in problems[0]
    spec, problems = validate_file(path, embedded=False)
    assert problems == [] and spec.resources.gpus_per_worker == 1


@pytest.mark.parametrize("problem", [None, "prefix-tuning cannot train a sequence-classification model (stand-in)"])
def test_prefix_tuning_is_refused_where_the_installed_libraries_cannot_train_it(tiny_world, tmp_path, monkeypatch,
                                                                                problem):
    from dataclasses import replace

    import trainers.inspect

    real = trainers.inspect.inspect_model
    monkeypatch.setattr(trainers.inspect, "inspect_model",
                        lambda name, task: replace(real(name, task), prefix_tuning_problem=problem))
    spec = merged(base_spec(tiny_world), {"peft.method": "prefix-tuning", "peft.target_modules": DELETE,
                                          "space": {"num_virtual_tokens": [2, 4]}})
    _, problems = validate_file(write_spec(tmp_path, spec))
    assert problems == ([f"peft.method: {problem}"] if problem else [])
