"""Tiny models and learnable data, built once per session in a temporary directory."""
from __future__ import annotations

import pytest
import torch

from trainers.settings import DataSettings, EngineSettings, ModelSettings, PeftSettings, TrainingSettings, TrialSettings
from trainers.tiny_models import (build_tiny_causal_lm, build_tiny_classifier, make_learnable_classification_data,
                                  make_learnable_lm_data)

# Per method: parameters for the tiny BERT / tiny llama, and a learning rate that learns the toy task
# in a few epochs (prompt methods and IA3 need far larger rates than LoRA, as in published practice).
BERT_PARAMS = {
    "lora": {"r": 4, "target_modules": ["query", "value"]},
    "prompt-tuning": {"num_virtual_tokens": 4},
    "prefix-tuning": {"num_virtual_tokens": 4},
    "ia3": {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]},
}
LLAMA_PARAMS = {
    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "prompt-tuning": {"num_virtual_tokens": 4},
    "prefix-tuning": {"num_virtual_tokens": 4},
    "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
}
LEARNING_RATES = {"lora": 3e-2, "prompt-tuning": 1e-1, "prefix-tuning": 1e-1, "ia3": 1e-1}
METHODS = tuple(BERT_PARAMS)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # The recipe sets torch's thread count from EngineSettings.num_threads (process-wide).
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_bert(tiny_dir):
    return build_tiny_classifier(str(tiny_dir / "bert"), num_labels=2, seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    return build_tiny_causal_lm(str(tiny_dir / "llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_dir):
    return build_tiny_causal_lm(str(tiny_dir / "gpt2"), arch="gpt2", seed=0)


@pytest.fixture(scope="session")
def cls_data(tiny_dir):
    return make_learnable_classification_data(str(tiny_dir / "cls.jsonl"), n=240, seed=0)


@pytest.fixture(scope="session")
def lm_data(tiny_dir):
    return make_learnable_lm_data(str(tiny_dir / "lm.jsonl"), n=160, seed=0)


def cls_settings(model_path, data_path, method="lora", **training) -> TrialSettings:
    training = {"learning_rate": LEARNING_RATES[method], "epochs": 3, "batch_size": 16, **training}
    return TrialSettings(
        model=ModelSettings(model_path, task="sequence-classification"),
        data=DataSettings(data_path, max_length=32),
        peft=PeftSettings(method, BERT_PARAMS[method]),
        training=TrainingSettings(**training),
        engine=EngineSettings(num_threads=1),
    )


def lm_settings(model_path, data_path, method="lora", quantization="none", **training) -> TrialSettings:
    training = {"learning_rate": LEARNING_RATES[method], "epochs": 2, "batch_size": 16, **training}
    return TrialSettings(
        model=ModelSettings(model_path, task="causal-lm", quantization=quantization),
        data=DataSettings(data_path, max_length=32),
        peft=PeftSettings(method, LLAMA_PARAMS[method]),
        training=TrainingSettings(**training),
        engine=EngineSettings(num_threads=1),
    )
