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
