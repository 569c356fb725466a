"""`peft-search export` round trips: the adapter loads with PeftModel.from_pretrained, the merged model with
AutoModelForSequenceClassification.from_pretrained, and both give the trial's own outputs (a merged chat model:
the trial's own generated answers).

The run directory is made by hand around one real trial (MiniLM, a few steps), so no Ray is needed."""
import json
import os
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from search.report.export import ExportError, export_adapter
from search.store.rundir import trial_dir
from trainers.hub import resolve_model_path
from trainers.recipe import run_trial
from trainers.settings import DataSettings, EngineSettings, ModelSettings, PeftSettings, TrainingSettings, TrialSettings

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "data", "stdlib_docstrings", "train.jsonl")
TEXTS = ["Return the number of seconds since the epoch.", "Open a socket and connect to the given address."]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    rows = open(DATA, encoding="utf-8").read().splitlines()[:96]
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    run = root / "run"
    settings = TrialSettings(
        model=ModelSettings("minilm"),
        data=DataSettings(str(root / "train.jsonl"), max_length=32, eval_fraction=0.25),
        peft=PeftSettings("lora", {"r": 4, "lora_alpha": 8, "target_modules": "auto"}),
        # a large learning rate, so that the adapter moves the outputs well away from the base's
        training=TrainingSettings(learning_rate=1e-2, epochs=1, batch_size=16, max_steps=4),
        engine=EngineSettings(num_threads=2),
    )
    run_trial(settings, lambda metrics: None, trial_dir(str(run), 0))
    shutil.copytree(os.path.join(trial_dir(str(run), 0), "adapter"), run / "best")
    (run / "search.json").write_text(json.dumps({"name": "export", "model": "minilm",
                                                 "task": "sequence-classification"}))
    return str(run)


def logits(model, tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def trial_model(run_dir):
    """The trial's own model: its saved adapter on a fresh base."""
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"),
                                                              num_labels=_num_labels(run_dir))
    return PeftModel.from_pretrained(base, os.path.join(trial_dir(run_dir, 0), "adapter"))


def _num_labels(run_dir):
    from trainers.model import _saved_num_labels
    return _saved_num_labels(os.path.join(run_dir, "best"))


def test_adapter_export_loads_with_peft_and_matches_the_trial(run_dir, tmp_path):
    out = export_adapter(run_dir, str(tmp_path / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"),
                                                              num_labels=_num_labels(run_dir))
    exported = PeftModel.from_pretrained(base, out)
    expected = logits(trial_model(run_dir), tokenizer)
    torch.testing.assert_close(logits(exported, tokenizer), expected)


def test_merged_export_loads_without_peft_and_matches_the_trial(run_dir, tmp_path):
    out = export_adapter(run_dir, str(tmp_path / "merged"), trial=0, merge=True)
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)   # the tokenizer travels with the merged model
    expected = logits(trial_model(run_dir), tokenizer)
    from safetensors.torch import load_file
    weights = load_file(os.path.join(run_dir, "best", "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items()), "merging must have work to do"
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=1e-4)


def test_export_refuses_a_non_empty_out_and_a_missing_trial(run_dir, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="--out"):
        export_adapter(run_dir, str(tmp_path / "full"))
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    with pytest.raises(ExportError, match="--trial: trial 7"):
        export_adapter(run_dir, str(tmp_path / "x"), trial=7)


def test_a_merged_chat_model_generates_the_trials_answers(tmp_path):
    """Chat rows judged on generated answers (issue 21): the merged export answers as base + adapter did."""
    from transformers import AutoModelForCausalLM

    from trainers.data import MESSAGES, split_records
    from trainers.generation import answer, questions
    from trainers.settings import GenerationSettings
    from trainers.tiny_models import TINY_CHAT_TEMPLATE, build_tiny_causal_lm, counting_conversations

    rows = counting_conversations(60)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = build_tiny_causal_lm(str(tmp_path / "llama"))
    generation = GenerationSettings(rows=8, max_new_tokens=4, examples=8)
    data = DataSettings(str(tmp_path / "chat.jsonl"), max_length=32, chat_template=TINY_CHAT_TEMPLATE)
    settings = TrialSettings(model=ModelSettings(model, task="causal-lm"), data=data,
                             peft=PeftSettings("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
                             training=TrainingSettings(learning_rate=3e-2, epochs=6, batch_size=12),
                             engine=EngineSettings(num_threads=1), generation=generation)
    reports = []
    run = tmp_path / "run"
    run_trial(settings, reports.append, trial_dir(str(run), 0))
    (run / "search.json").write_text(json.dumps({"name": "export", "model": model, "task": "causal-lm"}))
    out = export_adapter(str(run), str(tmp_path / "merged"), trial=0, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    _train, held = split_records(data)
    asked = questions(held, tokenizer, data, MESSAGES, generation)
    answers = answer(merged.eval(), tokenizer, asked, generation, torch.device("cpu"))
    assert answers == [row["answer"] for row in reports[-1]["answers"]] and any(answers)
