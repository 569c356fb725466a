"""A search through Ray judged on generated answers (issue 21): chat rows on a tiny llama, the objective a
generation metric; trials.csv, the Optuna storage and the report carry the scores, the answers and the base
model's zero-shot answers beside the best trial's."""
import json

import optuna
import pytest
from searches import finished_run, trial_rows

from trainers.tiny_models import TINY_CHAT_TEMPLATE, build_tiny_causal_lm, counting_conversations

pytestmark = pytest.mark.slow


def test_a_search_on_generated_answers(tmp_path):
    model = build_tiny_causal_lm(str(tmp_path / "llama"))
    rows = counting_conversations(60, distinct=True)   # copies of train rows in eval are refused
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {
        "name": "answers", "model": {"name_or_path": model, "task": "causal-lm"},
        "data": {"train": str(tmp_path / "chat.jsonl"), "max_length": 32, "chat_template": TINY_CHAT_TEMPLATE},
        "peft": {"method": "lora", "target_modules": ["q_proj", "v_proj"]},
        "space": {"r": [2, 4], "learning_rate": [3e-2, 5e-2]},
        "training": {"epochs": 6, "batch_size": 12},
        "objective": {"metric": "eval_token_f1"},
        "generation": {"rows": 8, "max_new_tokens": 4, "examples": 2},
        "search": {"algorithm": "random", "trials": 2, "concurrency": 1, "scheduler": "none", "seed": 1},
        "resources": {"deepspeed": False}, "tracking": {"wandb": "disabled"},
    }
    run_dir = finished_run(spec, tmp_path)
    trials = trial_rows(run_dir)
    assert [row["state"] for row in trials] == ["COMPLETE", "COMPLETE"]
    assert all(0 <= float(row["eval_token_f1"]) <= 1 and float(row["generate_s"]) > 0 for row in trials)
    study = optuna.load_study(study_name="peft-search", storage=f"sqlite:///{run_dir / 'study.sqlite3'}")
    first = study.trials[0].user_attrs
    assert 0 <= first["base_eval_token_f1"] <= 1 and len(first["base_answers"]) == 2
    assert not any(key.startswith("base_") for key in study.trials[1].user_attrs)   # answered once per search
    report = (run_dir / "report.md").read_text()
    assert "| base model, no adapter (zero-shot) |" in report and "## Generated answers" in report
    best = max(trials, key=lambda row: float(row["eval_token_f1"]))
    assert f"| best trial ({best['number']}) |" in report
    assert "base model:  " in report and "reference:   " in report
