"""resources.deepspeed: offload, the user's own DeepSpeed JSON (merged, checked at validate time), and what
a trial gets from them."""
from __future__ import annotations

import json

import pytest
from test_spec_helpers import DELETE, base_spec, merged, tiny_world, write_spec  # noqa: F401 (fixture)

from search.spec.search_spec import SpecError, load_spec


def _spec_with_json(tmp_path, world, config, **overrides):
    (tmp_path / "ds.json").write_text(config if isinstance(config, str) else json.dumps(config))
    # a relative path: read from the spec file's directory
    return write_spec(tmp_path, merged(base_spec(world), {"resources.deepspeed": {"config": "ds.json"}, **overrides}))


def _problems(path):
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return caught.value.problems


def test_conflicts_name_both_keys(tiny_world, tmp_path):
    config = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "train_micro_batch_size_per_gpu": 4,
              "gradient_clipping": 1.0, "optimizer": {"type": "Adam"}}
    problems = _problems(_spec_with_json(tmp_path, tiny_world, config))
    assert "resources.deepspeed.config: zero_optimization.stage=3 conflicts with resources.deepspeed.zero_stage=2" in problems
    assert "resources.deepspeed.config: train_micro_batch_size_per_gpu=4 conflicts with training.batch_size=8" in problems
    assert any(p.startswith("resources.deepspeed.config: optimizer conflicts with training.optimizer") for p in problems)
    assert len(problems) == 3   # gradient_clipping agrees with training.max_grad_norm; overlap_comm is the file's own


def test_a_searched_batch_size_conflicts_with_any_fixed_one(tiny_world, tmp_path):
    path = _spec_with_json(tmp_path, tiny_world, {"train_micro_batch_size_per_gpu": 8},
                           **{"training.batch_size": DELETE, "space.batch_size": [8, 16]})
    assert _problems(path) == ["resources.deepspeed.config: train_micro_batch_size_per_gpu=8 conflicts with "
                               "training.batch_size=16"]


def test_precision_is_checked_where_the_spec_decides_it(tiny_world, tmp_path):
    config = {"bf16": {"enabled": True}}
    # CPU workers run fp32 (model.dtype auto)
    assert _problems(_spec_with_json(tmp_path, tiny_world, config)) == [
        "resources.deepspeed.config: bf16.enabled=True conflicts with model.dtype (bf16.enabled=False)"]
    # on GPUs auto means "what the GPU has": decided when the trial starts
    spec = load_spec(_spec_with_json(tmp_path, tiny_world, config, **{"resources.gpus_per_worker": 1}))
    assert spec.trial_settings({}).engine.user_config == config


def test_unreadable_files(tiny_world, tmp_path):
    problems = _problems(_spec_with_json(tmp_path, tiny_world, "{not json"))
    assert len(problems) == 1 and problems[0].startswith("resources.deepspeed.config: ") and "is not valid JSON" in problems[0]
    assert _problems(_spec_with_json(tmp_path, tiny_world, "[1, 2]")) == [
        f"resources.deepspeed.config: {tmp_path / 'ds.json'} must hold a JSON object of DeepSpeed keys, got list"]
    path = write_spec(tmp_path, merged(base_spec(tiny_world), {"resources.deepspeed": {"config": "missing.json"}}))
    assert _problems(path)[0].startswith(f"resources.deepspeed.config: cannot read {tmp_path / 'missing.json'}")


def test_trial_settings_carry_offload_and_the_file(tiny_world, tmp_path):
    config = {"zero_optimization": {"reduce_bucket_size": 500000, "stage": "auto"}, "bf16": {"enabled": "auto"}}
    path = _spec_with_json(tmp_path, tiny_world, config, **{
        "resources.deepspeed.zero_stage": 3, "resources.deepspeed.offload_param": "cpu",
        "resources.deepspeed.offload_optimizer": "cpu", "resources.gpus_per_worker": 0.5,   # one worker: may share
        "training.optimizer": "paged_adamw_8bit"})
    settings = load_spec(path).trial_settings({})
    assert (settings.engine.zero_stage, settings.engine.offload_param, settings.engine.offload_optimizer) == (3, "cpu", "cpu")
    assert settings.engine.user_config == config and settings.training.optimizer == "paged_adamw_8bit"


@pytest.mark.parametrize("method, expected", [("prefix-tuning", False), ("lora", None)])
def test_unset_gradient_checkpointing_is_off_for_prefix_tuning(tiny_world, tmp_path, method, expected):
    """Unset means on for a quantized base, except for prefix tuning, which PEFT refuses to train with it."""
    overrides = {"model.quantization": "nf4", "peft.method": method}
    if method == "prefix-tuning":
        overrides.update({"peft.target_modules": DELETE, "space": {"num_virtual_tokens": [2, 4]}})
    spec = load_spec(write_spec(tmp_path, merged(base_spec(tiny_world), overrides)), check_model=False)
    assert spec.trial_settings({}).model.gradient_checkpointing is expected
