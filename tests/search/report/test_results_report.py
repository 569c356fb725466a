"""trials.csv and report.md built from a stored study fed made-up trials (no training)."""
import csv
import json

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search.report.sections import ReportInput, build_report
from search.store.results import (best_row, best_trial, failure_counts, objectives, pareto_front, rank_panel,
                                  trial_rows, write_trials_csv)

DIST = {"learning_rate": FloatDistribution(1e-5, 1e-2, log=True)}


def made_up_trials():
    def trial(state, value, lr, **attrs):
        return create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                            params={"learning_rate": lr}, distributions=DIST,
                            user_attrs={"param_learning_rate": lr, **attrs})
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(TrialState.COMPLETE, 0.7, 1e-4, tokens_per_s=10.0, eval_loss=0.6))
    study.add_trial(trial(TrialState.PRUNED, None, 1e-3, eval_accuracy=0.3,
                          fail_reason="stopped by the scheduler after round 1"))
    study.add_trial(trial(TrialState.FAIL, None, 5e-3, fail_reason="diverged at step 3 (loss=nan)"))
    study.add_trial(trial(TrialState.COMPLETE, 0.9, 2e-4, tokens_per_s=12.0, eval_loss=0.4))
    study.add_trial(trial(TrialState.COMPLETE, 0.9, 3e-4, tokens_per_s=11.0, eval_loss=0.5))
    return study.get_trials()


def test_rows_keep_every_state_and_reason(tmp_path):
    rows = trial_rows(made_up_trials(), ["eval_accuracy"])
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE", "COMPLETE"]
    assert rows[1]["eval_accuracy"] == 0.3  # a pruned trial shows its last value
    assert rows[2]["fail_reason"] == "diverged at step 3 (loss=nan)"
    path = tmp_path / "trials.csv"
    write_trials_csv(rows, str(path))
    back = list(csv.DictReader(open(path)))
    assert len(back) == 5 and back[2]["eval_accuracy"] == "" and back[0]["param_learning_rate"] == "0.0001"


def test_best_is_the_best_complete_trial_and_ties_go_to_the_earlier_one():
    rows = trial_rows(made_up_trials(), ["eval_accuracy"])
    assert best_row(rows, "eval_accuracy", "max")["number"] == 3
    assert best_row(rows, "eval_loss", "min")["number"] == 3
    assert best_row([r for r in rows if r["state"] != "COMPLETE"], "eval_accuracy", "max") is None


def test_report_has_best_baseline_and_failures():
    rows = trial_rows(made_up_trials(), ["eval_accuracy"])
    baseline = {"majority_label": "files", "eval_accuracy": 0.2, "eval_rows": 100}
    summary = {"name": "t", "model": "minilm", "task": "sequence-classification", "method": "lora",
               "metric": "eval_accuracy", "mode": "max", "algorithm": "tpe", "scheduler": "asha", "trials": 6,
               "baseline": baseline}
    text = build_report(ReportInput("/runs/t", summary, rows, best_row(rows, "eval_accuracy", "max"), wall_s=42))
    assert "Trials: 5 of 6 (3 complete, 1 pruned, 1 fail)" in text
    assert "majority class (always predicts `files`) | 0.2 |" in text
    assert "Trial 3: **eval_accuracy = 0.9**" in text
    assert "- trial 2: diverged at step 3 (loss=nan)" in text


def test_sensitivity_section_needs_enough_complete_trials_and_then_rates_settings():
    import random

    from search.refine.sensitivity import MIN_TRIALS_FOR_SENSITIVITY
    from search.report.blocks import Table, markdown_table
    from search.report.sections import sensitivity_blocks

    rng = random.Random(0)
    rows = []
    for number in range(30):
        lr, dropout = 10 ** rng.uniform(-4, -2), rng.uniform(0, 0.2)
        accuracy = 0.5 + (0.3 if 1e-3 <= lr <= 4e-3 else 0.0) + rng.uniform(-0.01, 0.01)
        rows.append({"number": number, "state": "COMPLETE", "param_learning_rate": lr,
                     "param_lora_dropout": dropout, "eval_accuracy": accuracy})
    few = sensitivity_blocks(rows[:MIN_TRIALS_FOR_SENSITIVITY - 1], "eval_accuracy", "max", None)
    assert any("Needs at least" in block for block in few if isinstance(block, str))
    blocks = sensitivity_blocks(rows, "eval_accuracy", "max", {"fanova": {"learning_rate": 0.9}})
    text = "\n".join(b if isinstance(b, str) else markdown_table(b.rows, b.columns) for b in blocks
                     if isinstance(b, (str, Table)))
    lr_line = next(line for line in text.splitlines() if line.startswith("| learning_rate"))
    dropout_line = next(line for line in text.splitlines() if line.startswith("| lora_dropout"))
    assert "HIGH" in lr_line and "LOW" in dropout_line
    assert "fanova importance: learning_rate 0.90" in text


def test_rows_carry_diagnostics_and_early_stop_reasons():
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.8, params={"learning_rate": 1e-4},
                                 distributions=DIST,
                                 user_attrs={"param_learning_rate": 1e-4, "diag_overfit_gap": 0.3,
                                             "diag_effective_rank_ratio": 0.5, "stopped_early": "loss plateau",
                                             "unrelated": 1}))
    row = trial_rows(study.get_trials(), ["eval_accuracy"])[0]
    assert row["diag_overfit_gap"] == 0.3 and row["diag_effective_rank_ratio"] == 0.5
    assert row["stopped_early"] == "loss plateau" and "unrelated" not in row


def two_objective_rows():
    """eval_accuracy (max) against adapter_mb (min); trial 2 is dominated by trial 1, trial 4 pruned."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for number, (state, acc, mb) in enumerate([
            (TrialState.COMPLETE, 0.90, 4.0), (TrialState.COMPLETE, 0.85, 1.0), (TrialState.COMPLETE, 0.80, 2.0),
            (TrialState.COMPLETE, 0.70, 0.5), (TrialState.PRUNED, 0.99, 0.1), (TrialState.COMPLETE, 0.90, 4.0)]):
        complete = state == TrialState.COMPLETE
        study.add_trial(create_trial(state=state, values=[acc, mb] if complete else None,
                                     params={"learning_rate": 1e-4 * (number + 1)}, distributions=DIST,
                                     user_attrs={"param_learning_rate": 1e-4 * (number + 1),
                                                 **({} if complete else {"eval_accuracy": acc, "adapter_mb": mb})}))
    return trial_rows(study.get_trials(), ["eval_accuracy", "adapter_mb"])


def test_pareto_front_keeps_non_dominated_complete_trials_only(tmp_path):
    rows = two_objective_rows()
    objs = objectives({"metric": ["eval_accuracy", "adapter_mb"], "mode": ["max", "min"]})
    assert objs == [("eval_accuracy", "max"), ("adapter_mb", "min")]
    front = [r["number"] for r in pareto_front(rows, objs)]
    assert front == [0, 1, 3, 5]  # 2 is dominated by 1; 4 was pruned; 0 and 5 tie and both stay
    # best/ holds the front member best on the first objective; ties go to the earlier trial
    assert best_trial(rows, objs)["number"] == 0
    write_trials_csv(rows, str(tmp_path / "trials.csv"))
    header = next(csv.reader(open(tmp_path / "trials.csv")))
    assert "eval_accuracy" in header and "adapter_mb" in header


def test_objectives_reject_a_mode_count_that_does_not_match():
    import pytest

    with pytest.raises(ValueError, match="one mode per metric"):
        objectives({"metric": ["eval_accuracy", "adapter_mb"], "mode": ["max"]})
    assert objectives({"metric": "eval_loss", "mode": "min"}) == [("eval_loss", "min")]


def test_rank_panel_normalizes_to_the_largest_rank_and_uses_pruned_trials_for_system_figures():
    rows = [
        {"number": 0, "state": "COMPLETE", "param_r": 4, "eval_accuracy": 0.80, "tokens_per_s": 100.0,
         "peak_mem_mb": 400.0, "adapter_mb": 1.0},
        {"number": 1, "state": "COMPLETE", "param_r": 4, "eval_accuracy": 0.70, "tokens_per_s": 120.0,
         "peak_mem_mb": 420.0, "adapter_mb": 1.0},
        {"number": 2, "state": "COMPLETE", "param_r": 16, "eval_accuracy": 0.90, "tokens_per_s": 50.0,
         "peak_mem_mb": 800.0, "adapter_mb": 4.0},
        # a pruned trial's objective never counts, its system figures do
        {"number": 3, "state": "PRUNED", "param_r": 16, "eval_accuracy": 0.99, "tokens_per_s": 70.0,
         "peak_mem_mb": 800.0, "adapter_mb": None},
        {"number": 4, "state": "FAIL", "param_r": 64, "eval_accuracy": None},
    ]
    panel = rank_panel(rows, "eval_accuracy", "max")
    assert [e["r"] for e in panel] == [4, 16]  # a failed trial's rank was not tested
    low, high = panel
    assert low["eval_accuracy"] == 0.80 and high["eval_accuracy"] == 0.90
    assert low["tokens_per_s"] == 110.0 and high["tokens_per_s"] == 60.0
    assert low["eval_accuracy/max"] == 0.80 / 0.90 and high["peak_mem_mb/max"] == 1.0
    assert low["adapter_mb/max"] == 0.25 and low["tokens_per_s/max"] == 110.0 / 60.0


def test_failure_counts_group_reasons_most_frequent_first():
    rows = [{"state": "FAIL", "fail_reason": "out of memory"}, {"state": "FAIL", "fail_reason": "diverged"},
            {"state": "FAIL", "fail_reason": "out of memory"}, {"state": "FAIL", "fail_reason": ""},
            {"state": "PRUNED", "fail_reason": "stopped by the scheduler"}]
    assert failure_counts(rows) == [("out of memory", 2), ("diverged", 1), ("no reason recorded", 1)]


def test_trial_settings_json_loads_back_through_the_recipe_cli_reader(tmp_path):
    from search.spec.search_spec import load_spec
    from search.store.rundir import write_settings
    from trainers.settings_io import settings_from_dict, settings_to_dict

    spec = load_spec("examples/lora_minilm.yaml", check_files=False, check_model=False)
    settings = spec.trial_settings({})
    path = write_settings(settings, str(tmp_path))
    with open(path, encoding="utf-8") as handle:  # as `python -m trainers.recipe --settings` reads it
        back = settings_from_dict(json.load(handle))
    assert settings_to_dict(back) == json.loads(json.dumps(settings_to_dict(settings)))
    assert back.training == settings.training and back.model == settings.model and back.data == settings.data
    assert dict(back.peft.params)["r"] == dict(settings.peft.params)["r"]


def test_ready_peft_config_builds_the_same_config_for_every_method(tmp_path):
    import peft

    from search.report.outputs import ready_peft_config

    made = [peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=0.05,
                            target_modules=["query", "value"], use_rslora=True),
            peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=10),
            peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
            peft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                           feedforward_modules=["output.dense"])]
    for i, config in enumerate(made):
        config.inference_mode = True  # as a saved adapter has it
        config.save_pretrained(str(tmp_path / str(i)))
        saved = json.loads((tmp_path / str(i) / "adapter_config.json").read_text())
        build, kwargs = ready_peft_config(saved)
        cls = type(config)
        assert build == f"{cls.__name__}(**config)"
        assert "peft_type" not in kwargs and "inference_mode" not in kwargs
        rebuilt = cls(**json.loads(json.dumps(kwargs)))
        expected = cls(**{k: v for k, v in saved.items() if k not in ("peft_type", "inference_mode")})
        assert rebuilt.to_dict() | {"base_model_name_or_path": None, "revision": None} == \
            expected.to_dict() | {"base_model_name_or_path": None, "revision": None}
        assert rebuilt.inference_mode is False  # ready to train


def made_up_summary():
    return {"name": "t", "model": "tiny", "task": "sequence-classification", "method": "lora",
            "metric": "eval_accuracy", "mode": "max", "algorithm": "tpe", "scheduler": "asha", "trials": 6}


def _packing_run_dir(tmp_path, chosen_by):
    """A run directory's packing.json (as trainers.packing.probe.decide writes it, or the spec's K) and the
    measured steps of two packing groups (as search/pool.serve_packed writes them)."""
    from dataclasses import asdict

    from search.store.packing_file import PACKING_FILE, write_json
    from trainers.packing.cost_model import BaseShape, Coefficients, CostModel, MemberShape, choose_k

    model = CostModel(BaseShape(params=90_000, matmul_params=70_000, quantized_params=0, hidden=64, layers=2,
                                logit_width=0), Coefficients(fixed_bytes=5e8, act_bytes=40, flops_per_s=2e10,
                                                             step_s=0.01, member_s=0.002))
    member = MemberShape(16, 32, 2178)
    choice = choose_k(model, member, budget_bytes=model.memory_bytes([member] * 3) + 1, k_max=6)
    decision = {"k": choice.k, "chosen_by": "cost model", "reason": choice.reason, "k_max": 6, "min_gain": 0.05,
                "budget_bytes": model.memory_bytes([member] * 3) + 1, "budget_from": "resources.memory_budget_gb",
                "device": "cpu", "member": asdict(member), **model.to_dict(), "probe_s": 2.5,
                "probe": [{"k": 1, "rows": 16, "seq": 32, "peak_bytes": 5.1e8, "step_s": 0.013,
                           "predicted_bytes": model.memory_bytes([member]), "predicted_step_s": model.step_s([member])}],
                "predicted": choice.rows} if chosen_by == "cost model" else {"k": 3, "chosen_by": "spec"}
    write_json(str(tmp_path / PACKING_FILE), decision)
    for group, (steps, peak) in enumerate([(10, 5.2e8), (30, 5.6e8)]):
        write_json(str(tmp_path / "packing" / f"tune-group{group}.json"), {"device": "cpu", "by_k": {
            "3": {"steps": steps, "seconds": steps * 0.02, "positions": steps * 3 * 16 * 20, "max_positions": 3 * 16 * 32,
                  "peak_bytes": peak}}})
    return choice


def test_packing_section_shows_the_cost_models_choice_and_the_measured_steps(tmp_path):
    from search.report.html import build_html
    from search.store.packing_file import read_packing

    choice = _packing_run_dir(tmp_path, "cost model")
    assert choice.k == 3   # the budget fits 3 members, not 4
    packing = read_packing(str(tmp_path))
    assert packing["measured"][3]["steps"] == 40 and packing["measured"][3]["peak_bytes"] == 5.6e8
    data = ReportInput(str(tmp_path), made_up_summary(), [], None, packing=packing)
    text = build_report(data)
    section = text.split("## Packing", 1)[1].split("\n## ", 1)[0]
    assert "**K = 3**, chosen by the cost model" in section and "over the budget" in section
    assert "| 4 | " in section   # the first K refused, with its prediction
    assert "| 3 | 40 | 48000 |" in section   # 40 steps of 3 x 16 rows x 20 tokens, 0.02 s each
    assert "534.1" in section   # the measured peak, MiB (5.6e8 B)
    assert "<h2>Packing</h2>" in build_html(data)


def test_packing_section_says_when_the_spec_fixed_k_and_is_absent_for_old_run_directories(tmp_path):
    from search.store.packing_file import read_packing

    assert read_packing(str(tmp_path)) is None
    assert "## Packing" not in build_report(ReportInput(str(tmp_path), made_up_summary(), [], None))
    _packing_run_dir(tmp_path, "spec")
    text = build_report(ReportInput(str(tmp_path), made_up_summary(), [], None, packing=read_packing(str(tmp_path))))
    section = text.split("## Packing", 1)[1].split("\n## ", 1)[0]
    assert "**K = 3** trials at once" in section and "`search.pack: 3`" in section
    assert "predicted" not in section   # nothing was predicted for a fixed K
