"""One real `peft-search run` through Ray Tune + Optuna + ASHA + Ray Train + DeepSpeed on a tiny spec,
checked by the files it writes (the run directory of INTERFACE.md), and for W&B keys (in the spec and in
WANDB_API_KEY) leaking into any of them or into its output (test_security.py checks each writer alone)."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from test_cli import cli
from test_security import ENV_API_KEY, SECRETS, SPEC_API_KEY, files_holding

from search.cli import main as cli_main
from trainers.tiny_models import build_tiny_classifier, make_learnable_classification_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = build_tiny_classifier(str(root / "tiny-bert"), num_labels=2)
    train = make_learnable_classification_data(str(root / "train.jsonl"), 160, seed=1)
    spec = {
        "name": "e2e",
        "model": {"name_or_path": model, "task": "sequence-classification"},
        "data": {"train": train, "text_field": "text", "label_field": "label", "max_length": 32},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        # 1e9 diverges at once: the search must record it as FAIL with its reason and go on
        "space": {"r": [2, 4], "learning_rate": [5e-3, 1e9]},
        "training": {"epochs": 2, "batch_size": 16},
        "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"algorithm": "random", "trials": 4, "concurrency": 2, "scheduler": "asha",
                   "evals_per_epoch": 1, "grace_rounds": 1, "seed": 3},
        "resources": {"workers_per_trial": 1, "deepspeed": {"zero_stage": 2}},
        "tracking": {"wandb": "offline", "api_key": SPEC_API_KEY},
    }
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    runs = root / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # offline, and nothing to reach anyway: the key must stay out of every file W&B writes
    env.update(WANDB_API_KEY=ENV_API_KEY, WANDB_BASE_URL="http://127.0.0.1:9",
               WANDB_CONFIG_DIR=str(root / "wandb-config"), WANDB_CACHE_DIR=str(root / "wandb-cache"),
               WANDB_DATA_DIR=str(root / "wandb-data"))
    proc = subprocess.run([sys.executable, "-m", "search", "run", str(spec_path), "--runs-dir", str(runs)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs / "e2e", model, proc.stdout, proc.stderr


def read_rows(run_dir):
    with open(run_dir / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_trial_is_accounted_for_with_its_state(finished_run):
    run_dir, _, _, _ = finished_run
    rows = read_rows(run_dir)
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED", "FAIL"}
    for column in ("param_r", "param_learning_rate", "eval_accuracy", "tokens_per_s", "peak_mem_mb",
                   "adapter_mb", "train_s", "energy_j", "fail_reason"):
        assert column in rows[0]


def test_diverging_trials_fail_with_their_reason_and_others_complete(finished_run):
    run_dir, _, _, _ = finished_run
    rows = read_rows(run_dir)
    failed = [r for r in rows if float(r["param_learning_rate"]) > 1]
    assert failed, "the seeded sampler should have drawn the diverging learning rate at least once"
    assert all(r["state"] == "FAIL" and "diverged at step" in r["fail_reason"] for r in failed)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert complete and all(float(r["tokens_per_s"]) > 0 and float(r["train_s"]) > 0 for r in complete)


def test_best_adapter_is_the_best_complete_trial_and_reloads(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_dir, model_path, _, _ = finished_run
    best = run_dir / "best"
    assert (best / "adapter_model.safetensors").is_file() and (best / "adapter_config.json").is_file()
    metrics = json.loads((best / "metrics.json").read_text())
    complete = [r for r in read_rows(run_dir) if r["state"] == "COMPLETE"]
    assert float(metrics["eval_accuracy"]) == pytest.approx(max(float(r["eval_accuracy"]) for r in complete))
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(best))
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor([[2, 5, 7, 3]])).logits
    assert logits.shape == (1, 2)


def test_trials_ran_in_a_deepspeed_zero2_worker_group(finished_run):
    run_dir, _, _, _ = finished_run
    complete = [r for r in read_rows(run_dir) if r["state"] == "COMPLETE"]
    trial_metrics = json.loads((run_dir / "trials" / f"{int(complete[0]['number']):04d}" / "metrics.json").read_text())
    assert trial_metrics["engine"] == "deepspeed-zero2" and trial_metrics["world_size"] == 1


def test_each_trial_has_an_offline_wandb_run_in_the_run_directory(finished_run):
    run_dir, _, _, _ = finished_run
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    # one run per trial (rank 0) plus the search's summary run with the trials table
    assert len(runs) >= 5, runs
    assert all(list(r.glob("*.wandb")) for r in runs)


def test_spec_report_and_study_are_written(finished_run):
    run_dir, _, stdout, _ = finished_run
    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert saved["name"] == "e2e" and saved["peft"]["method"] == "lora"
    report = (run_dir / "report.md").read_text()
    assert "## Best trial" in report and "majority class" in report and "## Failed trials" in report
    assert "## Best trial" in stdout  # the run ends by printing its report
    assert (run_dir / "study.sqlite3").is_file()


def test_the_terminal_shows_the_products_lines_and_the_libraries_chatter_is_in_the_log(finished_run):
    """No library warning or worker line on the terminal (not a TTY here: plain lines); they are in
    RUN_DIR/logs/search.log, whose tail follows the diverging trial's line."""
    run_dir, _, stdout, stderr = finished_run
    before_report = stdout.split("# peft-search report")[0]
    # the product's lines; the spec's warnings; a failed trial's log tail, indented under its line
    foreign = [line for line in (before_report + stderr).splitlines()
               if line.strip() and not re.match(r"\[peft-search\] |warning: | {4}", line)]
    assert not foreign, foreign
    log = (run_dir / "logs" / "search.log").read_text()
    assert "(RayTrainWorker pid=" in log and "(TrainController pid=" in log and "Configuration for experiment" in log
    assert re.search(r"^\[peft-search\] trial \d+ FAILED: diverged at step", before_report, re.MULTILINE)
    assert re.search(r"^\[peft-search\] trial \d+ failed: (the last \d+ lines of|no new lines in) \S+/logs/search\.log",
                     before_report, re.MULTILINE)


def test_report_command_rebuilds_from_storage(finished_run):
    run_dir, _, _, _ = finished_run
    before = (run_dir / "trials.csv").read_text()
    os.remove(run_dir / "trials.csv")
    os.remove(run_dir / "report.md")
    assert cli_main(["report", str(run_dir)]) == 0
    assert (run_dir / "trials.csv").read_text() == before
    assert (run_dir / "report.md").is_file()


def test_run_refuses_a_directory_that_holds_a_search(finished_run, capsys):
    run_dir, _, _, _ = finished_run
    code, _, err = cli(capsys, "run", str(run_dir / "spec.yaml"), "--runs-dir", str(run_dir.parent))
    assert code == 2 and "already holds a search" in err


def test_diagnostics_and_the_html_report_come_through_ray(finished_run):
    run_dir, _, _, _ = finished_run
    complete = [r for r in read_rows(run_dir) if r["state"] == "COMPLETE"]
    for row in complete:
        assert 0.0 < float(row["diag_effective_rank_ratio"]) <= 1.0
        assert row["diag_overfit_gap"] != ""
    html = (run_dir / "report.html").read_text()
    assert "<h2>Best trial</h2>" in html and "<h2>All trials</h2>" in html


def test_the_reproduce_command_retrains_the_best_trial(finished_run, tmp_path):
    run_dir, _, _, _ = finished_run
    number = int(json.loads((run_dir / "best" / "metrics.json").read_text())["number"])
    best = json.loads((run_dir / "trials" / f"{number:04d}" / "metrics.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "trainers.recipe", "--settings", str(run_dir / "best" / "settings.json"),
                           "--out", str(tmp_path / "again")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    # same settings and seed; the search ran it under DeepSpeed in Ray, this runs it in one plain process
    assert again["step"] == best["step"]
    assert again["eval_accuracy"] == pytest.approx(float(best["eval_accuracy"]), abs=0.05)
    assert "python -m trainers.recipe --settings" in (run_dir / "report.md").read_text()


def test_no_key_reaches_the_run_directory_or_the_output(finished_run):
    """spec.yaml, reports, W&B run files, Ray Tune's state and pickles, DeepSpeed checkpoints, the study: after
    the other tests here rebuilt the reports from storage."""
    run_dir, _, stdout, stderr = finished_run
    assert (run_dir / "ray" / "tune" / "tuner.pkl").is_file() and list((run_dir / "wandb").glob("offline-run-*"))
    assert list(run_dir.glob("trials/*/checkpoint")), "DeepSpeed checkpoints to search"
    assert files_holding(run_dir) == {}
    assert not [s for s in SECRETS if s in stdout + stderr]
