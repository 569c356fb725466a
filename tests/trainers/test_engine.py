import math

import pytest
import torch

from trainers.deepspeed_config import (DeepSpeedConfigError, deepspeed_config, generated_config, merged_config,
                                       precision_of)
from trainers.engine import PlainEngine, build_optimizer, create_engine, parameter_groups, warmup_cosine
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


def test_fp16_steps_are_loss_scaled_and_an_overflow_is_skipped():
    torch.manual_seed(0)
    model = _Tiny()
    engine = PlainEngine(model, TrainingSettings(learning_rate=0.1, warmup_ratio=0.0), total_steps=4, precision="fp16")
    scale = engine.scaler.get_scale()
    before = model.proj.weight.detach().clone()
    engine.backward(model(torch.full((2, 4), float("inf"))))   # an fp16 overflow: inf gradients
    engine.step()
    assert torch.equal(before, model.proj.weight) and engine.scaler.get_scale() == scale / 2   # skipped, scale halved
    assert engine.scheduler.last_epoch == 0                    # the schedule waits for a real step
    engine.backward(model(torch.randn(2, 4)))
    engine.step()
    assert not torch.equal(before, model.proj.weight) and torch.isfinite(model.proj.weight).all()
    assert PlainEngine(_Tiny(), TrainingSettings(), total_steps=4, precision="bf16").scaler is None


def test_paged_adamw_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU refusal; tests/trainers/test_gpu.py trains with it on a GPU")
    with pytest.raises(ValueError, match="training.optimizer: paged_adamw_8bit .* needs a CUDA GPU"):
        build_optimizer(_Tiny(), TrainingSettings(optimizer="paged_adamw_8bit"), total_steps=4)
    with pytest.raises(ValueError, match="training.optimizer must be one of"):
        build_optimizer(_Tiny(), TrainingSettings(optimizer="sgd"), total_steps=4)


def test_deepspeed_config_from_settings():
    training = TrainingSettings(batch_size=8, gradient_accumulation_steps=4, max_grad_norm=0.3)
    config = deepspeed_config(training, EngineSettings(zero_stage=3, offload_param="cpu"), "fp16", world_size=2)
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "none"},
                                           "offload_param": {"device": "cpu"}}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (8, 4, 64, 0.3)
    assert config["fp16"] == {"enabled": True} and config["bf16"] == {"enabled": False}
    assert [precision_of(name) for name in ("torch.bfloat16", "float16", "float32")] == ["bf16", "fp16", "fp32"]
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        generated_config(training, EngineSettings(zero_stage=4), "bf16", 1)
    with pytest.raises(ValueError, match="offload_param needs zero_stage 3 .*, got zero_stage=2"):
        generated_config(training, EngineSettings(zero_stage=2, offload_param="cpu"), "bf16", 1)


def test_user_config_is_merged_under_the_generated_one():
    generated = generated_config(TrainingSettings(batch_size=8), EngineSettings(zero_stage=2), "bf16", 1)
    user = {"zero_optimization": {"stage": "auto", "overlap_comm": True, "offload_optimizer": {"pin_memory": True}},
            "bf16": {"enabled": "auto"}, "communication_data_type": "fp32"}
    config = merged_config(user, generated)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "offload_param": {"device": "none"},
                                           "offload_optimizer": {"device": "none", "pin_memory": True}}
    assert config["bf16"] == {"enabled": True} and config["communication_data_type"] == "fp32"
    assert user["zero_optimization"]["stage"] == "auto"   # the user's mapping is left as it was


def test_user_config_conflicts_name_both_keys():
    generated = generated_config(TrainingSettings(batch_size=8), EngineSettings(zero_stage=2), "fp32", 2)
    user = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, "train_batch_size": 32,
            "fp16": {"enabled": True}, "scheduler": {"type": "WarmupLR"}}
    with pytest.raises(DeepSpeedConfigError) as caught:
        merged_config(user, generated)
    assert caught.value.problems == [
        "resources.deepspeed.config: scheduler conflicts with training.learning_rate / training.warmup_ratio: the "
        "trial passes its own optimizer and schedule to DeepSpeed; remove 'scheduler' from the file",
        "resources.deepspeed.config: train_batch_size=32 conflicts with training.batch_size x "
        "training.gradient_accumulation_steps x workers (16)",
        "resources.deepspeed.config: zero_optimization.stage=3 conflicts with resources.deepspeed.zero_stage=2",
        "resources.deepspeed.config: fp16.enabled=True conflicts with model.dtype (fp16.enabled=False)",
        "resources.deepspeed.config: zero_optimization.reduce_bucket_size='auto' has no value here (only the HF "
        "Trainer fills it); give a value or remove it"]
