"""Host memory pressure in a real search: a worker over `resources.memory_per_worker_gb` fails its trial with an
out-of-memory reason (recorded, never retried), its worker group lives on for the next trial, nothing hangs."""
import pytest
from searches import run_spec, trial_rows

from trainers.tiny_models import build_tiny_classifier, make_learnable_classification_data

pytestmark = pytest.mark.slow


def test_trials_over_the_memory_cap_fail_with_the_reason_and_the_search_ends(tmp_path):
    model = build_tiny_classifier(str(tmp_path / "tiny-bert"), num_labels=2)
    train = make_learnable_classification_data(str(tmp_path / "train.jsonl"), 32, seed=1)
    spec = {
        "name": "capped",
        "model": {"name_or_path": model, "task": "sequence-classification"},
        "data": {"train": train, "text_field": "text", "label_field": "label", "max_length": 16},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        "space": {"r": [2, 4]},
        "training": {"epochs": 1, "batch_size": 16},
        "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"algorithm": "grid", "trials": 2, "concurrency": 1, "scheduler": "none"},
        # below what any worker process with torch loaded holds: every trial is over the cap as it starts
        "resources": {"deepspeed": {"enabled": False}, "memory_per_worker_gb": 0.05},
        "tracking": {"wandb": "disabled"},
    }
    proc = run_spec(spec, tmp_path, timeout=600)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = trial_rows(tmp_path / "runs" / "capped")
    assert [row["state"] for row in rows] == ["FAIL", "FAIL"], output
    for row in rows:
        reason = row["fail_reason"]
        assert reason.startswith("out of memory at ") and "over its 51 MiB cap (resources.memory_per_worker_gb)" in reason
        assert "retries" not in reason   # a deterministic failure is not retried
    assert "out of memory" in (tmp_path / "runs" / "capped" / "report.md").read_text()
    # Tune's read-back of per-trial result files peft-search does not write stays quiet
    assert "Failed to fetch metrics" not in proc.stdout + proc.stderr, output
