"""Spec keys of token classification (issue 21): what `validate` accepts and refuses (exit 2, each bad row named by
file, row and field; methods PEFT cannot train the task with, with the reason), the objective's defaults, and the
DataSettings the trials get."""
from __future__ import annotations

import json
import os

import pytest
from test_spec_helpers import DELETE, base_spec, merged, tiny_world, write_spec  # noqa: F401 (fixture)

from search.cli import main as cli_main
from search.spec.validate import validate_file
from trainers.tiny_models import make_learnable_token_data

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "ner_minilm.yaml")


def _token_spec(world, tmp_path, train_rows=None, **overrides):
    train = str(tmp_path / "train.jsonl")
    if train_rows is None:
        make_learnable_token_data(train, 40, seed=0)
    else:
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train_rows))
    spec = merged(base_spec(world), {
        "model.task": "token-classification", "data.train": train, "data.eval": DELETE, "data.label_field": DELETE,
        "data.text_field": DELETE, "objective": DELETE, "space.alpha_ratio": DELETE,
    })
    return write_spec(tmp_path, merged(spec, overrides))


def _validate(path, capsys):
    capsys.readouterr()
    code = cli_main(["validate", path])
    return code, capsys.readouterr().err


def test_the_example_validates_with_the_ner_objective():
    spec, problems = validate_file(EXAMPLE, embedded=False)
    assert problems == []
    assert spec.model.task == "token-classification"
    assert (spec.objective.metric, spec.objective.mode, spec.objective.task_kind) == ("eval_f1", "max", "ner")
    data = spec.trial_settings({}).data
    assert (data.tokens_field, data.tags_field) == ("tokens", "tags") and data.train.endswith("train.conll")


def test_a_token_spec_defaults_to_entity_f1_and_the_ner_bar(tiny_world, tmp_path):
    spec, problems = validate_file(_token_spec(tiny_world, tmp_path))
    assert problems == []
    assert (spec.objective.metric, spec.objective.mode, spec.objective.task_kind) == ("eval_f1", "max", "ner")


@pytest.mark.parametrize("metric, mode", [("eval_f1_POS", "max"), ("eval_recall", "max"), ("eval_loss", "min")])
def test_entity_metrics_and_per_type_f1_may_be_the_objective(tiny_world, tmp_path, metric, mode):
    spec, problems = validate_file(_token_spec(tiny_world, tmp_path, **{"objective.metric": metric}))
    assert problems == [] and (spec.objective.metric, spec.objective.mode) == (metric, mode)


@pytest.mark.parametrize("overrides, expected", [
    ({"peft": {"method": "prompt-tuning", "num_virtual_tokens": 4}, "space": {"learning_rate": [1e-3, 1e-2]}},
     "peft.method: prompt-tuning cannot train token-classification with PEFT"),
    ({"data.label_field": "label"}, "data.label_field: token-classification reads one tag per word"),
    ({"data.format": "text"}, "data.format: token-classification rows are words and tags"),
    ({"objective.metric": "eval_perplexity"}, "objective.metric: token-classification reports eval_loss, "
                                              "eval_accuracy, eval_precision, eval_recall, eval_f1, eval_f1_<TYPE>"),
    ({"data.tags_field": "tokens"}, "data.tags_field: must differ from data.tokens_field"),
])
def test_keys_that_do_not_fit_the_task_are_refused_with_the_reason(tiny_world, tmp_path, capsys, overrides, expected):
    code, err = _validate(_token_spec(tiny_world, tmp_path, **overrides), capsys)
    assert code == 2 and expected in err, err


@pytest.mark.parametrize("bad, expected", [
    ({"tokens": ["a", "b", "c"], "tags": ["O", "B-POS"]}, "row 3, field tags: has 2 tags for 3 words"),
    ({"tokens": ["a", "b"], "tags": ["O", None]}, "row 3, field tags[1]: must be a string, got null"),
    ({"tokens": ["a", "b"], "tags": ["O", "POS"]}, "row 3, field tags[1]: 'POS' is not a BIO tag"),
])
def test_a_bad_row_is_named_and_validate_exits_2(tiny_world, tmp_path, capsys, bad, expected):
    good = {"tokens": ["good", "film"], "tags": ["B-POS", "O"]}
    path = _token_spec(tiny_world, tmp_path, train_rows=[good, good, bad] + [good] * 10)
    code, err = _validate(path, capsys)
    assert code == 2 and f"data.train: {tmp_path / 'train.jsonl'}, {expected}" in err, err


def test_an_eval_tag_that_train_lacks_is_refused(tiny_world, tmp_path, capsys):
    held = tmp_path / "eval.conll"
    held.write_text("-DOCSTART- O\n\ngood B-POS\n\nbad B-NEG\nopen() B-FUNC\n")
    code, err = _validate(_token_spec(tiny_world, tmp_path, **{"data.eval": str(held)}), capsys)
    assert code == 2 and f"data.eval: {held}, row 2 (line 5), field tags: tag(s) B-FUNC do not occur in train" in err


def test_packed_lora_trials_are_allowed(tiny_world, tmp_path):
    _spec, problems = validate_file(_token_spec(tiny_world, tmp_path, **{"search.pack": 2}))
    assert problems == []
