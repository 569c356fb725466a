"""Generation-based evaluation (trainers/generation.py): the rows answered, batched left-padded greedy answers, the
scores against hand-computed strings, and the recipe's reports with the base model's answers beside them, in one
process and in a ZeRO-3 group of two ranks."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
from ranks import run_ranks
from test_chat_data import TEMPLATE, _chat_rows, _write
from trainers_helpers import LLAMA_PARAMS
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainers.recipe as recipe
from trainers.data import CAUSAL_LM, MESSAGES, PROMPT_COMPLETION
from trainers.distributed import current_context
from trainers.generation import answer, chosen_rows, generation_round, questions, score
from trainers.settings import (DataSettings, EngineSettings, GenerationSettings, ModelSettings, PeftSettings,
                               TrainingSettings, TrialSettings)
from trainers.settings_io import settings_to_dict

WORKER = Path(__file__).with_name("deepspeed_worker.py")


def test_scores_against_hand_computed_strings():
    got = score(["The cat sat.", "a dog"], ["the cat sat", "the dog barked"])
    # SQuAD normalisation drops case, punctuation and articles: "cat sat" == "cat sat"; "dog" != "dog barked"
    assert got["eval_exact_match"] == pytest.approx(0.5)
    # token F1: 1, and P = 1, R = 1/2 -> 2/3
    assert got["eval_token_f1"] == pytest.approx((1 + 2 / 3) / 2)
    # ROUGE-L F1: 1, and LCS "dog": P = 1/2, R = 1/3 -> 0.4
    assert got["eval_rougeL"] == pytest.approx((1 + 0.4) / 2)
    assert 0 < got["eval_chrf"] < 1
    assert score(["the cat sat"], ["the cat sat"])["eval_chrf"] == pytest.approx(1.0)
    assert score(["xyz"], ["abc"])["eval_chrf"] == pytest.approx(0.0)


def test_the_rows_answered_are_seeded_capped_and_the_same_every_time():
    assert chosen_rows(100, 8, seed=3) == chosen_rows(100, 8, seed=3) != chosen_rows(100, 8, seed=4)
    assert len(chosen_rows(100, 8, seed=3)) == 8 and chosen_rows(5, 8, seed=3) == [0, 1, 2, 3, 4]


def test_questions_take_the_prompt_and_the_reference(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data = DataSettings("x", chat_template=TEMPLATE, max_length=64)
    conversation = {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"},
                                 {"role": "user", "content": "four"}, {"role": "assistant", "content": "five six"}]}
    (asked,) = questions([conversation], tokenizer, data, MESSAGES, GenerationSettings(rows=4))
    # the conversation up to the last assistant turn, with the generation prompt; that turn is the reference
    assert asked.prompt == "[SEP] one two <s> three </s> [SEP] four <s> " and asked.reference == "five six"
    assert asked.prompt_ids == tokenizer(asked.prompt, add_special_tokens=False)["input_ids"]
    row = {"prompt": "one two three four", "completion": " five"}
    (asked,) = questions([row], tokenizer, replace(data, max_length=3), PROMPT_COMPLETION, GenerationSettings(rows=4))
    # a string prompt keeps the tokenizer's special tokens; a long one keeps its end
    assert asked.reference == " five" and len(asked.prompt_ids) == 3
    assert asked.prompt_ids == tokenizer(row["prompt"])["input_ids"][-3:]
    assert questions([row], tokenizer, data, PROMPT_COMPLETION, GenerationSettings(rows=0)) == []


def test_batched_left_padded_answers_equal_one_row_at_a_time(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    rows = [{"prompt": prompt, "completion": " x"} for prompt in
            ("one", "one two three four five", "six seven", "eight nine ten one two three")]
    asked = questions(rows, tokenizer, DataSettings("x", max_length=64), PROMPT_COMPLETION, GenerationSettings(rows=4))
    settings = GenerationSettings(rows=4, max_new_tokens=6, batch_size=4)
    together = answer(model, tokenizer, asked, settings, current_context().device)
    alone = answer(model, tokenizer, asked, replace(settings, batch_size=1), current_context().device)
    assert together == alone and len(set(together)) > 1


def _chat_settings(tmp_path, tiny_llama, **generation):
    return TrialSettings(
        model=ModelSettings(tiny_llama, task=CAUSAL_LM),
        data=DataSettings(_write(tmp_path / "chat.jsonl", _chat_rows(60)), max_length=32, chat_template=TEMPLATE),
        peft=PeftSettings("lora", LLAMA_PARAMS["lora"]),
        training=TrainingSettings(learning_rate=3e-2, epochs=6, batch_size=12),
        engine=EngineSettings(num_threads=1),
        generation=GenerationSettings(**{"rows": 8, "max_new_tokens": 4, "examples": 2, **generation}))


def test_a_trial_reports_its_answers_and_the_base_models(tmp_path, tiny_llama):
    settings = _chat_settings(tmp_path, tiny_llama, base_answers=True)
    reports = []
    recipe.run_trial(settings, reports.append, str(tmp_path / "trial"))
    first, last = reports[0], reports[-1]
    for name in ("eval_exact_match", "eval_token_f1", "eval_rougeL", "eval_chrf"):
        assert 0.0 <= last[name] <= 1.0 and 0.0 <= last[f"base_{name}"] <= 1.0
        assert first[f"base_{name}"] == last[f"base_{name}"]   # answered once, carried by every report
    assert last["generate_s"] > 0 and "base_generate_s" not in last
    assert [set(example) for example in last["answers"]] == [{"prompt", "reference", "answer"}] * 2
    assert [e["reference"] for e in last["answers"]] == [e["reference"] for e in last["base_answers"]]
    # the numbers rows follow one pattern: trained, the trial answers better than the base model does
    assert last["eval_token_f1"] > last["base_eval_token_f1"]
    # a LoRA adapter starts as the identity (B = 0): before training, adapter on and off answer alike
    untrained = recipe.setup(settings)
    try:
        on = generation_round(untrained.peft_model, untrained.base.tokenizer, untrained.questions,
                              settings.generation, untrained.ctx)
    finally:
        recipe.cleanup(untrained)
    assert [e["answer"] for e in on["answers"]] == [e["answer"] for e in last["base_answers"]]
    assert on["eval_rougeL"] == last["base_eval_rougeL"]


def test_text_rows_generate_nothing(tmp_path, tiny_llama, lm_data):
    settings = TrialSettings(model=ModelSettings(tiny_llama, task=CAUSAL_LM), data=DataSettings(lm_data, max_length=16),
                             peft=PeftSettings("lora", LLAMA_PARAMS["lora"]),
                             training=TrainingSettings(epochs=1, batch_size=16, max_steps=1),
                             engine=EngineSettings(num_threads=1), generation=GenerationSettings(rows=8))
    reports = []
    recipe.run_trial(settings, reports.append, str(tmp_path / "trial"))
    assert "eval_rougeL" not in reports[-1] and "answers" not in reports[-1]


@pytest.mark.slow
def test_zero3_ranks_answer_as_one_process(tmp_path, tiny_llama):
    """Two ZeRO-3 ranks (weights partitioned, generation in step) score the same answers as one process."""
    pytest.importorskip("deepspeed")
    settings = _chat_settings(tmp_path, tiny_llama, base_answers=True)
    settings = replace(settings, training=replace(settings.training, epochs=1, max_steps=1, learning_rate=1e-9),
                       engine=EngineSettings(deepspeed=True, zero_stage=3, num_threads=1))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"settings": settings_to_dict(settings)}))
    for end in run_ranks([WORKER, job, tmp_path], 2, timeout=600):
        assert end.returncode == 0, end.output[-4000:]
    ranks = [json.loads((tmp_path / f"reports-{rank}.json").read_text())["reports"][0][-1] for rank in range(2)]
    solo = []
    recipe.run_trial(replace(settings, engine=EngineSettings(deepspeed=False, num_threads=1)), solo.append,
                     str(tmp_path / "solo"))
    for name in ("eval_rougeL", "eval_chrf", "base_eval_token_f1", "answers", "base_answers"):
        assert ranks[0][name] == ranks[1][name] == solo[-1][name], name
