"""One real `peft-search run` of a token-classification spec through Ray Tune + Optuna + Ray Train on a tiny BERT:
every trial reports entity-level metrics (trials.csv), and the report judges the best one by the NER bar."""
import pytest
from searches import finished_run, trial_rows

from trainers.tiny_models import build_tiny_token_classifier, make_learnable_token_data

pytestmark = pytest.mark.slow


def test_a_token_classification_search_reports_entity_f1(tmp_path):
    model = build_tiny_token_classifier(str(tmp_path / "tiny-bert-ner"), num_labels=5)
    train = make_learnable_token_data(str(tmp_path / "train.jsonl"), 120, seed=1)
    spec = {
        "name": "ner-e2e",
        "model": {"name_or_path": model, "task": "token-classification"},
        "data": {"train": train, "max_length": 32},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        "space": {"r": [2, 4], "learning_rate": [1e-2, 3e-2]},
        "training": {"epochs": 2, "batch_size": 16},
        "search": {"algorithm": "random", "trials": 2, "concurrency": 2, "scheduler": "none", "seed": 0},
        "resources": {"workers_per_trial": 1},
        "tracking": {"wandb": "disabled"},
    }
    run_dir = finished_run(spec, tmp_path, timeout=600)
    rows = trial_rows(run_dir)
    assert len(rows) == 2 and all(row["state"] == "COMPLETE" for row in rows), rows
    for row in rows:
        for name in ("eval_f1", "eval_precision", "eval_recall", "eval_accuracy", "eval_f1_POS", "eval_f1_NEG"):
            assert 0.0 <= float(row[name]) <= 1.0, (name, row)
    report = (run_dir / "report.md").read_text()
    assert "eval_f1" in report and "the PEFT guide's bar for ner" in report
