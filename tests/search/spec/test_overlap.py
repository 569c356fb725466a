"""Validate-time data checks of issue 3 item 3: train/eval overlap (counts, warning, error), and the
early-stopping keys of `training:` that reach each trial's settings."""
from __future__ import annotations

import json
import os
import random

import pytest
from test_spec_helpers import base_spec, merged, tiny_world, write_spec  # noqa: F401 (fixture)

from search.cli import main as cli_main
from search.spec.search_spec import SpecError, load_spec
from search.spec.validate import check_file, validate_file
from trainers.diagnostics import near_duplicates, normalize_text, text_overlap

_WORDS = [f"w{index}" for index in range(400)]


def _sentences(count, seed, length=20):
    rng = random.Random(seed)
    return [" ".join(rng.sample(_WORDS, length)) for _ in range(count)]


def _rows_with_known_overlap():
    """20 train rows; 10 eval rows: 3 exact copies (case and whitespace changed), 2 near copies, 5 new."""
    train = _sentences(20, seed=0)
    eval_texts = [
        train[0].upper(),                                      # exact after casefolding
        "  " + train[1].replace(" ", " \t\n ") + " ",          # exact after collapsing whitespace
        train[2],
        " ".join(train[3].split()[:-1] + ["changed"]),         # last word changed: Jaccard 15/17
        train[4] + " appended",                                # one word more: Jaccard 16/17
        " ".join(train[5].split()[:6]) + " " + " ".join(_sentences(1, seed=9, length=14)[0].split()),  # one 5-gram
        *_sentences(4, seed=1),
    ]
    return train, eval_texts


def test_exact_and_near_duplicates_are_counted():
    train, eval_texts = _rows_with_known_overlap()
    overlap = text_overlap(train, eval_texts)
    assert overlap.eval_rows == 10
    assert overlap.exact == (0, 1, 2)
    assert overlap.near == (3, 4)   # not row 5: sharing one 5-gram is topic overlap, not a copy


def test_normalized_text_ignores_case_and_whitespace():
    assert normalize_text("  Return\tthe  VALUE.\n") == "return the value."


def _brute_force_near(train, queries, threshold):
    def shingle_set(text):
        words = text.split(" ")
        return {tuple(words)} if len(words) < 5 else {tuple(words[i:i + 5]) for i in range(len(words) - 4)}

    train_sets = [shingle_set(text) for text in train]
    return [position for position, text in enumerate(queries)
            if any(len(shingle_set(text) & other) >= threshold * len(shingle_set(text) | other) - 1e-9
                   for other in train_sets)]


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_prefix_filtered_search_finds_exactly_what_all_pairs_find(threshold):
    rng = random.Random(threshold)
    vocabulary = [f"v{index}" for index in range(30)]     # a small vocabulary: many partial overlaps
    train = [" ".join(rng.choices(vocabulary, k=rng.randint(1, 25))) for _ in range(80)]
    queries = []
    for _ in range(80):
        words = rng.choice(train).split(" ")
        for _edit in range(rng.randint(0, 3)):
            words[rng.randrange(len(words))] = rng.choice(vocabulary)
        queries.append(" ".join(words + rng.choices(vocabulary, k=rng.choice([0, 0, 2]))))
    found = near_duplicates(train, queries, threshold)
    assert found == _brute_force_near(train, queries, threshold)
    assert 0 < len(found) < len(queries)


def _write_rows(path, texts):
    with open(path, "w", encoding="utf-8") as handle:
        for index, text in enumerate(texts):
            handle.write(json.dumps({"text": text, "label": "ab"[index % 2]}) + "\n")
    return str(path)


def _spec_with_data(tiny_world, tmp_path, train_texts, eval_texts=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    overrides = {"data.train": _write_rows(tmp_path / "train.jsonl", train_texts)}
    overrides["data.eval"] = _write_rows(tmp_path / "eval.jsonl", eval_texts) if eval_texts is not None else None
    return write_spec(tmp_path, merged(base_spec(tiny_world), overrides))


def test_a_few_copied_eval_rows_are_a_warning(tiny_world, tmp_path):
    train, eval_texts = _rows_with_known_overlap()
    path = _spec_with_data(tiny_world, tmp_path, train, eval_texts)
    spec, problems, warnings = check_file(path)
    assert spec is not None and problems == []
    assert warnings == ["warning: data.eval: 3 of 10 eval rows also appear in data.train (the same text after "
                        "casefolding and collapsing whitespace), and 2 more are near duplicates (word 5-gram "
                        "Jaccard >= 0.8); eval metrics on them overstate generalisation"]
    assert validate_file(path)[1] == []


def test_mostly_copied_eval_rows_are_a_problem(tiny_world, tmp_path):
    train = _sentences(20, seed=0)
    half = _spec_with_data(tiny_world, tmp_path / "half", train, train[:3] + _sentences(3, seed=1))
    assert check_file(half)[1] == []                                # exactly half: still a warning
    most = _spec_with_data(tiny_world, tmp_path / "most", train, train[:4] + _sentences(2, seed=1))
    spec, problems = validate_file(most)
    assert spec is None
    assert problems == ["data.eval: 4 of 6 eval rows also appear in data.train (the same text after casefolding "
                        "and collapsing whitespace); the eval metrics would measure memorisation: remove them "
                        "from data.eval"]


def test_a_held_out_split_overlaps_when_train_repeats_rows(tiny_world, tmp_path):
    # every row twice: the seeded split sends one copy of some rows to eval and keeps the other for training
    path = _spec_with_data(tiny_world, tmp_path, _sentences(20, seed=0) * 2)
    spec, problems, warnings = check_file(path)
    assert spec is None and len(problems) == 1
    assert problems[0].startswith("data.train: 8 of 8 rows held out for eval also appear in the rows trained on")
    assert problems[0].endswith("deduplicate data.train")
    clean = _spec_with_data(tiny_world, tmp_path / "clean", _sentences(40, seed=0))
    assert check_file(clean)[1:] == ([], [])


def test_cli_validate_prints_the_warning_and_exits_0_or_2(tiny_world, tmp_path, capsys):
    train, eval_texts = _rows_with_known_overlap()
    assert cli_main(["validate", _spec_with_data(tiny_world, tmp_path / "few", train, eval_texts)]) == 0
    out, err = capsys.readouterr()
    assert "valid" in out and err.startswith("warning: data.eval: 3 of 10 eval rows also appear in data.train")
    assert cli_main(["validate", _spec_with_data(tiny_world, tmp_path / "most", train, train[:8])]) == 2
    assert capsys.readouterr().err.startswith("data.eval: 8 of 8 eval rows also appear in data.train")


def test_quickstart_data_has_no_copies_and_four_near_duplicates():
    spec, problems, warnings = check_file(os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples",
                                                       "quickstart.yaml"))
    assert spec is not None and problems == []
    assert warnings == ["warning: data.eval: 4 of 398 eval rows are near duplicates (word 5-gram Jaccard >= 0.8) "
                        "of rows in data.train; eval metrics on them overstate generalisation"]


# --- early stopping keys ---------------------------------------------------------------------------
def test_early_stopping_keys_reach_the_trial_settings(tiny_world, tmp_path):
    spec = load_spec(write_spec(tmp_path, merged(base_spec(tiny_world), {
        "training.early_stopping_patience": 2, "training.early_stopping_min_delta": 0.001})))
    training = spec.trial_settings({}).training
    assert (training.early_stopping_patience, training.early_stopping_min_delta) == (2, 0.001)
    assert (training.monitor, training.monitor_mode) == ("eval_accuracy", "max")   # the objective's metric
    assert spec.to_dict()["training"]["early_stopping_patience"] == 2
    default = load_spec(write_spec(tmp_path, base_spec(tiny_world))).trial_settings({}).training
    assert default.early_stopping_patience is None and default.early_stopping_min_delta == 0.0


@pytest.mark.parametrize("objective, monitor", [
    ({"metric": "eval_loss", "mode": "min"}, ("eval_loss", "min")),
    ({"metric": "tokens_per_s", "mode": "max"}, ("eval_loss", "min")),           # not a training signal
    ({"metric": ["peak_mem_mb", "eval_f1"], "mode": ["min", "max"]}, ("eval_f1", "max")),
])
def test_plateau_watches_the_first_eval_objective(tiny_world, tmp_path, objective, monitor):
    overrides = {"objective": objective, "training.early_stopping_patience": 1}
    if isinstance(objective["metric"], list):
        overrides["search.scheduler"] = "none"
    spec = load_spec(write_spec(tmp_path, merged(base_spec(tiny_world), overrides)))
    training = spec.trial_settings({}).training
    assert (training.monitor, training.monitor_mode) == monitor


@pytest.mark.parametrize("key, value, message", [
    ("early_stopping_patience", 0, "training.early_stopping_patience: must be >= 1, got 0"),
    ("early_stopping_patience", "two", "training.early_stopping_patience: must be an integer, got 'two' (str)"),
    ("early_stopping_min_delta", -0.1, "training.early_stopping_min_delta: must be >= 0, got -0.1"),
])
def test_bad_early_stopping_values_name_the_key(tiny_world, tmp_path, key, value, message):
    with pytest.raises(SpecError) as error:
        load_spec(write_spec(tmp_path, merged(base_spec(tiny_world), {f"training.{key}": value})))
    assert message in error.value.problems
