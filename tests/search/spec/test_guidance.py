"""The published guidance against the user's setup (search/spec/guidance.py): warnings and the quality bar."""
from search.spec.guidance import quality_verdict, setup_warnings


def test_too_few_rows_for_lora_classification_is_warned():
    (warning,) = setup_warnings("classification", "lora", 320, 22e6)
    assert "320 rows" in warning and "500" in warning
    assert setup_warnings("classification", "lora", 800, 22e6) == []
    assert setup_warnings(None, "lora", 10, 22e6) == []   # no task kind: nothing to check against


def test_prompt_tuning_where_the_guide_advises_against_it():
    found = setup_warnings("extractive-qa", "prompt-tuning", None, 135e6, num_virtual_tokens=[8, 20])
    assert any("does not recommend prompt tuning for extractive-qa" in w for w in found)
    assert any("at most 20 virtual tokens on a 135M-parameter model" in w for w in found)
    assert setup_warnings("summarization", "prompt-tuning", None, 7e9, num_virtual_tokens=[20]) == []
    assert setup_warnings("summarization", "prompt-tuning", None, 135e6, num_virtual_tokens=[64]) == []


def test_quality_bar_of_the_task_or_the_users_own():
    assert quality_verdict("extractive-qa", {"eval_exact_match": 0.75, "eval_f1": 0.85}) == (
        "Clears the PEFT guide's bar for extractive-qa: `eval_exact_match` 0.75 > 0.7, `eval_f1` 0.85 > 0.82.")
    verdict = quality_verdict("extractive-qa", {"eval_exact_match": 0.75, "eval_f1": 0.80})
    assert verdict.startswith("Does not clear") and "`eval_f1` 0.8 <= 0.82" in verdict
    assert quality_verdict("summarization", {"eval_rougeL": 0.40}).startswith("Clears")
    own = quality_verdict("classification", {"eval_accuracy": 0.6}, threshold=0.5, metric="eval_accuracy")
    assert own == "Clears your objective.threshold: `eval_accuracy` 0.6 > 0.5."
    assert quality_verdict("classification", {"eval_accuracy": 0.9}) is None      # no f1: no verdict
    assert quality_verdict(None, {"eval_f1": 0.9}) is None


def test_validate_warns_from_the_guide_and_the_report_says_whether_the_bar_is_cleared(tmp_path):
    import os

    import yaml

    from search.report.sections import ReportInput, best_section
    from search.spec.validate import check_file

    examples = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples")
    raw = yaml.safe_load(open(os.path.join(examples, "quickstart.yaml")))
    for key in ("train", "eval"):
        raw["data"][key] = os.path.abspath(os.path.join(examples, raw["data"][key]))
    raw["objective"].update(task_kind="classification", threshold=0.6)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec, problems, warnings = check_file(str(path))
    assert problems == [] and spec.objective.task_kind == "classification"
    assert not any("rows; the PEFT guide" in w for w in warnings)   # 1595 train rows: above the minimum
    raw["objective"]["task_kind"] = "sentiment"
    path.write_text(yaml.safe_dump(raw))
    _spec, problems, _warnings = check_file(str(path))
    assert any(p.startswith("objective.task_kind:") for p in problems)

    best = {"number": 3, "state": "COMPLETE", "eval_accuracy": 0.7}
    summary = {"metric": "eval_accuracy", "mode": "max", "task_kind": "classification", "threshold": 0.6}
    data = ReportInput(run_dir=str(tmp_path), summary=summary, rows=[best], best=best)
    text = "\n".join(b for b in best_section(data).blocks if isinstance(b, str))
    assert "Clears your objective.threshold: `eval_accuracy` 0.7 > 0.6." in text
