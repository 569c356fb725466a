"""Settings and per-method parameters shared by the trainers tests (a plain module: conftest is not importable)."""
from __future__ import annotations

from trainers.settings import DataSettings, EngineSettings, ModelSettings, PeftSettings, TrainingSettings, TrialSettings

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


def skip_refused_prefix_tuning(method: str, model_path: str) -> None:
    """Skip a classifier test of prefix tuning where the installed transformers and PEFT cannot train it: the
    trainer and validate refuse it with the reason there (test_adapters and test_recipe check the refusal)."""
    import pytest

    from trainers.inspect import inspect_model

    problem = inspect_model(model_path, "sequence-classification").prefix_tuning_problem
    if method == "prefix-tuning" and problem:
        pytest.skip(problem)


def packed_reports(base, members) -> dict:
    """Each member's round reports (key -> list) when `members` ({key: TrialSettings}) train packed on `base`,
    evaluated at their round ends as the pool does; one torch thread, as their solo runs in these tests."""
    import torch

    from trainers.packing.pack import Pack

    torch.set_num_threads(1)
    reports: dict = {}
    with Pack(base) as pack:
        for key, settings in members.items():
            pack.add(key, settings)
        while any(member.trains for member in pack.members.values()):
            result = pack.step()
            assert not result.failed, result.failed
            for key in result.round_ends:
                reports.setdefault(key, []).append(pack.evaluate(key))
    return reports
