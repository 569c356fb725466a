"""Spec keys of prompt-completion and chat data (issue 21): what `validate` accepts, refuses (exit 2, each bad
row named by file, row and field; completions that mostly do not fit max_length) and shows (one row as
trained, the part the loss covers between ⟦ and ⟧), and the DataSettings the trials get."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_spec_helpers import DELETE, base_spec, merged, tiny_world, write_spec  # noqa: F401 (fixture)

from search.cli import main as cli_main
from search.spec.validate import check_file, validate_file
from trainers.tiny_models import NEUTRAL_WORDS, NUMBER_WORDS, TINY_CHAT_TEMPLATE


def _question(index: int) -> str:
    """A different question for every index below 360 (rows that repeat would be refused as eval copies)."""
    return f"{NEUTRAL_WORDS[index % 36]} {NUMBER_WORDS[index // 36]} one"


def _conversation(index: int, answer_words: int = 2):
    start = index % 5
    return {"messages": [{"role": "user", "content": _question(index)},
                         {"role": "assistant",
                          "content": " ".join(NUMBER_WORDS[(start + 3 + word) % 10] for word in range(answer_words))}]}


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _chat_spec(world, tmp_path, train_rows=None, **overrides):
    train = _write(tmp_path / "train.jsonl", train_rows if train_rows is not None else
                   [_conversation(index) for index in range(30)])
    spec = merged(base_spec(world), {
        "model.name_or_path": world["llama"], "model.task": "causal-lm",
        "data.train": train, "data.eval": DELETE, "data.label_field": DELETE, "data.text_field": DELETE,
        "data.chat_template": TINY_CHAT_TEMPLATE, "objective": DELETE,
    })
    return write_spec(tmp_path, merged(spec, overrides))


def _validate(path, capsys):
    capsys.readouterr()
    code = cli_main(["validate", path])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_chat_spec_validates_and_shows_one_row_as_trained(tiny_world, tmp_path, capsys):
    path = _chat_spec(tiny_world, tmp_path)
    code, out, err = _validate(path, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("valid (lora on " + tiny_world["llama"] + ", 3 searched parameters, 4 trials)")
    assert lines[1] == ("data: messages rows (from the first row), rendered with data.chat_template; "
                        "the loss covers the assistant turns only")
    assert lines[2] == (f"{tmp_path / 'train.jsonl'}, row 1 as trained (8 tokens, 3 in the loss, "
                        f"the assistant turns between ⟦ and ⟧):")
    assert lines[3] == "    [SEP] the one one <s>⟦four five </s>⟧"
    assert err == ""


def test_the_trials_get_the_data_keys(tiny_world, tmp_path):
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TINY_CHAT_TEMPLATE)
    spec, problems = validate_file(_chat_spec(tiny_world, tmp_path, **{
        "data.chat_template": str(template_file), "data.completion_only_loss": False, "data.format": "messages"}))
    assert problems == []
    data = spec.trial_settings({}).data
    assert (data.format, data.messages_field, data.completion_only_loss) == ("messages", "messages", False)
    assert data.chat_template == TINY_CHAT_TEMPLATE   # the file's text: workers need no copy of it
    assert spec.to_dict()["data"]["chat_template"] == str(template_file)


def test_prompt_completion_rows_with_their_own_field_names(tiny_world, tmp_path, capsys):
    rows = [{"q": _question(index), "a": f" {NUMBER_WORDS[index % 10]}"} for index in range(30)]
    path = _chat_spec(tiny_world, tmp_path, rows, **{"data.prompt_field": "q", "data.completion_field": "a",
                                                      "data.chat_template": DELETE})
    code, out, err = _validate(path, capsys)
    assert code == 0, err
    assert "data: prompt-completion rows (from the first row), prompt and completion joined, EOS added; " \
           "the loss covers the completion only" in out
    assert "    the one one⟦one </s>⟧" in out


def test_bad_rows_exit_2_naming_file_row_and_field(tiny_world, tmp_path):
    rows = [_conversation(index) for index in range(30)]
    rows[4] = {"messages": [{"role": "user", "content": "one"}]}
    rows[9] = {"messages": [{"role": "user", "content": "one"}, {"role": "robot", "content": "two"}]}
    rows[11] = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": ""}]}
    rows[20] = {"conversation": []}
    path = _chat_spec(tiny_world, tmp_path, rows)
    train = tmp_path / "train.jsonl"
    # the real process, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "search", "validate", path], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"data.train: {train}, row 5, field messages: no assistant turn (nothing to learn)",
        f"data.train: {train}, row 10, field messages[1].role: must be one of system, user, assistant, got 'robot'",
        f"data.train: {train}, row 12, field messages[1].content: an empty assistant turn (nothing to learn)",
        f"data.train: {train}, row 21, field messages: missing (data.messages_field)",
    ]


def test_bad_rows_also_stop_run_before_anything_starts(tiny_world, tmp_path, capsys):
    rows = [_conversation(index) for index in range(30)]
    rows[2] = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": 7}]}
    path = _chat_spec(tiny_world, tmp_path, rows)
    capsys.readouterr()
    assert cli_main(["run", path, "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "row 3, field messages[1].content: must be a string, got a number (7)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_completions_that_do_not_fit_are_counted_and_refused_when_most_do(tiny_world, tmp_path, capsys):
    rows = [_conversation(index, answer_words=2 if index % 4 else 5) for index in range(40)]   # a quarter long
    path = _chat_spec(tiny_world, tmp_path, rows, **{"data.max_length": 5})
    code, _out, err = _validate(path, capsys)
    assert code == 0
    assert err.startswith("warning: data.max_length: the completions of 10 of 40 rows of data.train do not fit 5 "
                          f"tokens (first: {tmp_path / 'train.jsonl'}, row 1, 6 completion tokens)")
    path = _chat_spec(tiny_world, tmp_path, rows, **{"data.max_length": 2})
    code, _out, err = _validate(path, capsys)
    assert code == 2
    assert err.startswith("data.max_length: the completions of 40 of 40 rows of data.train do not fit 2 tokens")
    assert "raise data.max_length or shorten the completions" in err
    # a searched max_length is checked at its smallest value
    path = _chat_spec(tiny_world, tmp_path, rows, **{"data.max_length": DELETE, "space.max_length": [2, 32]})
    _spec, problems, _warnings = check_file(path)
    assert problems and problems[0].startswith("space.max_length: the completions of 40 of 40 rows")


@pytest.mark.parametrize("overrides, expected", [
    ({"data.chat_template": DELETE}, "data.chat_template: {llama}: the tokenizer has no chat template; give one as "
                                     "data.chat_template"),
    ({"data.chat_template": "no-such-template.jinja"},   # a file name: relative to the spec's directory
     "no-such-template.jinja' is neither a Jinja template"),
    ({"data.chat_template": "{% for m in messages %}{{ m['content'] }"}, "the chat template cannot render it"),
    ({"data.format": "dialogue"}, "data.format: must be one of text, prompt-completion, messages, got 'dialogue'"),
    ({"data.prompt_field": "x", "data.completion_field": "x"}, "data.completion_field: must differ from"),
    ({"data.completion_only_loss": "yes"}, "data.completion_only_loss: must be true or false"),
])
def test_chat_key_problems(tiny_world, tmp_path, overrides, expected):
    _spec, problems = validate_file(_chat_spec(tiny_world, tmp_path, **overrides))
    assert any(expected.format(**tiny_world) in problem for problem in problems), problems


def test_rows_of_two_formats_need_data_format(tiny_world, tmp_path):
    rows = [dict(_conversation(index), text=_question(index)) for index in range(30)]
    _spec, problems = validate_file(_chat_spec(tiny_world, tmp_path, rows))
    assert len(problems) == 1 and problems[0].startswith("data.format: ")
    assert "holds the fields of several formats ('messages', 'text'): set data.format to one of messages, text" \
        in problems[0]
    spec, problems = validate_file(_chat_spec(tiny_world, tmp_path, rows, **{"data.format": "text"}))
    assert problems == [] and spec.trial_settings({}).data.format == "text"


def test_classification_takes_text_rows_only(tiny_world, tmp_path):
    _spec, problems = validate_file(write_spec(tmp_path, merged(base_spec(tiny_world), {"data.format": "messages"})))
    assert problems == ["data.format: sequence-classification reads data.text_field (and data.label_field); "
                        "prompt-completion and messages rows are for causal-lm, got 'messages'"]


def test_text_specs_are_unchanged(tiny_world, tmp_path, capsys):
    rows = [{"text": _question(index) + " two three"} for index in range(30)]
    path = _chat_spec(tiny_world, tmp_path, rows, **{"data.chat_template": DELETE, "data.text_field": "text"})
    code, out, err = _validate(path, capsys)
    assert code == 0, err
    assert len(out.splitlines()) == 1 and out.startswith(f"{path}: valid")   # no row preview: every token counts
    data = validate_file(path)[0].trial_settings({}).data
    assert (data.text_field, data.format, data.chat_template, data.completion_only_loss) == ("text", None, None, True)
    # rows without a text field: the problem also says how other formats are given
    rows = [{"prompt": _question(index), "answer": "two"} for index in range(30)]
    _spec, problems = validate_file(_chat_spec(tiny_world, tmp_path, rows, **{"data.chat_template": DELETE}))
    assert problems[0].startswith("data.text_field: 'text' is missing or empty in 30 of 30 rows of data.train")
    assert "data.prompt_field and data.completion_field, or data.messages_field" in problems[0]


# --- generation-based evaluation -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    ({"objective": {"metric": "eval_rougeL"}, "generation": {"rows": 0}},
     "objective.metric: eval_rougeL scores generated answers; set generation.rows (eval rows answered each round) "
     "above 0, got 0"),
    ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens: must be >= 1, got 0"),
    ({"generation": {"rows": -1}}, "generation.rows: must be >= 0, got -1"),
    ({"generation": {"row": 8}}, "generation.row: unknown key (did you mean 'rows'?)"),
])
def test_generation_key_problems(tiny_world, tmp_path, overrides, expected):
    _spec, problems = validate_file(_chat_spec(tiny_world, tmp_path, **overrides))
    assert any(problem.startswith(expected) for problem in problems), problems


def test_generation_metrics_are_causal_lm_objectives(tiny_world, tmp_path):
    objective = {"metric": ["eval_rougeL", "eval_chrf", "eval_exact_match", "eval_token_f1"]}
    spec, problems = validate_file(_chat_spec(tiny_world, tmp_path, **{
        "objective": objective, "search.scheduler": "none", "search.algorithm": "nsga2",
        "generation": {"rows": 12, "max_new_tokens": 8, "examples": 2}}))
    assert problems == []
    assert spec.objective.modes == ("max",) * 4
    generation = spec.trial_settings({}).generation
    assert (generation.rows, generation.max_new_tokens, generation.examples, generation.seed) == (12, 8, 2, 0)
    assert not generation.base_answers   # the trial function asks the first trial for them
    assert spec.to_dict()["generation"]["rows"] == 12
    _spec, problems = validate_file(write_spec(tmp_path, merged(base_spec(tiny_world),
                                                                {"objective.metric": "eval_rougeL"})))
    assert any(problem.startswith("objective.metric: sequence-classification reports eval_loss")
               for problem in problems)


def test_generation_metrics_need_rows_with_a_reference_answer(tiny_world, tmp_path):
    text_rows = [{"text": f"{_question(index)} four five"} for index in range(30)]
    path = _chat_spec(tiny_world, tmp_path, text_rows, **{"objective": {"metric": "eval_chrf"}})
    _spec, problems, _warnings = check_file(path)
    assert problems == [f"objective.metric: eval_chrf scores generated answers against each row's reference answer, "
                        f"and text rows hold none; give prompt-completion or messages rows, got text rows in "
                        f"{tmp_path / 'train.jsonl'}"]
