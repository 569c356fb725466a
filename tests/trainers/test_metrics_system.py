import json
import math
from dataclasses import fields, replace
from types import MappingProxyType

import pytest
import torch

from trainers.data import IGNORE_INDEX, KEEP
from trainers.metrics import EvalCounts, macro_f1
from trainers.settings import DataSettings, ModelSettings, PeftSettings, TrainingSettings, TrialSettings
from trainers.settings_io import SettingsError, settings_from_dict, settings_to_dict
from trainers.system import TrainMeter, _Rapl, adapter_mb, energy_counter, peak_mem_mb


def test_classification_counts_and_macro_f1():
    counts = EvalCounts("sequence-classification", num_labels=3)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2, 2])
    counts.add(logits, {"labels": labels, KEEP: torch.tensor([1.0, 1, 1, 1, 0])})   # the last row is padding
    metrics = counts.reduced().metrics()
    assert metrics["eval_accuracy"] == pytest.approx(3 / 4)
    # per label F1: 0 -> tp1 fn1 = 2/3; 1 -> tp1 fp1 = 2/3; 2 -> tp1 = 1
    assert metrics["eval_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    expected_loss = torch.nn.functional.cross_entropy(logits[:4], labels[:4]).item()
    assert metrics["eval_loss"] == pytest.approx(expected_loss)
    assert macro_f1([0, 1], [0, 0], [0, 0]) == 1.0     # a label absent from rows and predictions is left out


def test_lm_loss_skips_padding_and_prompt_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 2 + 4, 7)                 # two virtual-token positions in front (prompt tuning)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, IGNORE_INDEX, IGNORE_INDEX]])
    counts = EvalCounts("causal-lm")
    counts.add(logits, {"labels": labels})
    metrics = counts.metrics()
    text_logits = logits[:, 2:, :]
    expected = torch.nn.functional.cross_entropy(text_logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
    assert counts.loss_items == 4
    assert metrics["eval_loss"] == pytest.approx(expected.item())
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(expected.item()))
    # next-token accuracy over the same 4 predicted positions (padding and prompt positions left out)
    predicted, targets = text_logits[:, :-1].argmax(-1), labels[:, 1:]
    counted = targets != IGNORE_INDEX
    assert metrics["eval_accuracy"] == pytest.approx(((predicted == targets) & counted).sum().item() / 4)


def test_system_figures(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 2 ** 20)
    (tmp_path / "README.md").write_text("not counted")
    assert adapter_mb(str(tmp_path)) == 1.0
    assert peak_mem_mb(torch.device("cpu")) > 10
    meter = TrainMeter(torch.device("cpu"))
    meter.start()
    sum(range(10 ** 5))
    meter.tokens = 1000
    meter.stop()
    figures = meter.figures()
    assert figures["train_s"] > 0 and figures["tokens_per_s"] == pytest.approx(1000 / figures["train_s"])
    # energy is measured where RAPL is readable, else unknown (None), never made up
    assert (figures["energy_j"] is None) == (energy_counter(torch.device("cpu")) is None)


def test_rapl_counter_handles_wraparound(tmp_path, monkeypatch):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("900000\n")
    monkeypatch.setattr("trainers.system.glob.glob", lambda pattern: [str(zone)])
    counter = _Rapl()
    (zone / "energy_uj").write_text("100000\n")        # wrapped past the range: +200000 uJ
    assert counter.read() == pytest.approx(0.2)


def test_settings_round_trip_and_errors(tmp_path):
    settings = TrialSettings(model=ModelSettings("minilm"), data=DataSettings("train.jsonl"),
                             peft=PeftSettings("lora", MappingProxyType({"r": 4, "target_modules": ("q", "v")})))
    restored = settings_from_dict(json.loads(json.dumps(settings_to_dict(settings))))
    assert restored.peft.params == {"r": 4, "target_modules": ["q", "v"]}
    assert replace(restored, peft=settings.peft) == settings
    with pytest.raises(SettingsError) as error:
        settings_from_dict({"model": {"name": "x"}, "training": {"lr": 1}})
    assert error.value.problems == [
        "data: required",
        "model.name: unknown key; known: " + ", ".join(f.name for f in fields(ModelSettings)),
        "model.name_or_path: required",
        "training.lr: unknown key; known: " + ", ".join(f.name for f in fields(TrainingSettings)),
    ]
    assert "learning_rate, epochs" in error.value.problems[3]
