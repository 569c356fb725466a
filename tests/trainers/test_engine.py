import math

import pytest
import torch

from trainers.engine import PlainEngine, create_engine, deepspeed_config, parameter_groups, warmup_cosine
from trainers.settings import EngineSettings, TrainingSettings


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.ia3_l = torch.nn.Parameter(torch.ones(4, 1))
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.norm(self.proj(x) * self.ia3_l.T).sum()


def test_no_weight_decay_on_biases_norms_and_scaling_vectors():
    model = _Tiny()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [model.proj.weight.shape]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4   # proj.bias, norm w+b, ia3_l


def test_warmup_then_cosine():
    factor = warmup_cosine(total_steps=100, warmup_ratio=0.05)
    warm = [factor(step) for step in range(5)]
    assert warm == sorted(warm) and 0 < warm[0] < warm[-1] < 1
    assert factor(5) == 1.0
    assert factor(5 + 95 // 2) == pytest.approx(0.5, abs=0.02)   # half way through the decay
    assert factor(99) < 0.01
    assert warmup_cosine(10, 0.0)(0) == 1.0


def test_plain_engine_accumulates_clips_and_schedules():
    torch.manual_seed(0)
    model = _Tiny()
    training = TrainingSettings(learning_rate=0.1, gradient_accumulation_steps=3, max_grad_norm=0.5, warmup_ratio=0.0)
    engine = create_engine(model, training, EngineSettings(deepspeed=True), total_steps=4)
    assert isinstance(engine, PlainEngine)   # no process group: the plain path, DeepSpeed or not
    before = model.proj.weight.detach().clone()
    stepped = []
    for _ in range(6):
        engine.backward(model(torch.randn(2, 4)) * 100)
        stepped.append(engine.step())
    assert stepped == [False, False, True, False, False, True] and engine.optimizer_steps == 2
    assert engine.last_grad_norm > 0.5          # clipped down to max_grad_norm before the step
    assert not torch.equal(before, model.proj.weight)
    assert engine.lr == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))


def test_deepspeed_config_from_settings():
    training = TrainingSettings(batch_size=8, gradient_accumulation_steps=4, max_grad_norm=0.3)
    config = deepspeed_config(training, EngineSettings(zero_stage=3), bf16=False)
    assert config["zero_optimization"] == {"stage": 3} and config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 0.3
    assert config["bf16"] == {"enabled": False}
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        deepspeed_config(training, EngineSettings(zero_stage=4), bf16=True)
