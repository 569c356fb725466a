"""A few steps on the real pretrained MiniLM (the `minilm` alias): real BERT weights and tokenizer."""
import pytest
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from trainers.hub import resolve_model_path
from trainers.recipe import run_trial
from trainers.settings import DataSettings, EngineSettings, ModelSettings, PeftSettings, TrainingSettings, TrialSettings


def test_recipe_on_minilm(tmp_path, cls_data):
    try:
        path = resolve_model_path("minilm")
    except ImportError as exc:
        pytest.skip(str(exc))
    settings = TrialSettings(
        model=ModelSettings("minilm"),
        data=DataSettings(cls_data, max_length=32, eval_fraction=0.1),
        peft=PeftSettings("lora", {"r": 4, "target_modules": "auto"}),   # the BERT preset: query, value
        training=TrainingSettings(learning_rate=5e-4, epochs=1, batch_size=8, max_steps=4),
        engine=EngineSettings(num_threads=2),
    )
    reports = []
    final = run_trial(settings, reports.append, str(tmp_path))
    assert len(reports) == 1 and final["step"] == 4 and 0.0 <= final["eval_accuracy"] <= 1.0
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert '"query"' in config and '"value"' in config
    # The new classification head travels with the adapter (modules_to_save), so it reloads on a fresh base.
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                                         str(tmp_path / "adapter"))
    assert any("classifier" in name for name, _ in reloaded.named_parameters())
