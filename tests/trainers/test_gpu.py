"""The recipe on a CUDA GPU: bf16, fp16, NF4 QLoRA with paged 8-bit AdamW, DeepSpeed over NCCL, CUDA memory
(figures, and its release after each trial) and NVML energy figures."""
import gc
import importlib.util
import math
from dataclasses import replace

import pytest
import torch
from trainers_helpers import cls_settings, lm_settings

from trainers.errors import TrialFailed
from trainers.model import load_base
from trainers.recipe import run_trial
from trainers.settings import EngineSettings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_lora_trial_on_gpu(tmp_path, tiny_bert, cls_data):
    settings = cls_settings(tiny_bert, cls_data, "lora", epochs=4)
    base = load_base(settings.model, num_labels=2)
    assert base.device.type == "cuda" and base.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported()
                                                         else torch.float32)
    reports = []
    final = run_trial(settings, reports.append, str(tmp_path), base=base)
    assert final["eval_accuracy"] >= 0.65 and final["eval_loss"] < reports[0]["eval_loss"]
    assert 0 < final["peak_mem_mb"] < 2000           # CUDA allocations of a tiny model, not the process RSS
    if importlib.util.find_spec("pynvml"):
        assert final["energy_j"] is not None and final["energy_j"] >= 0


def test_qlora_nf4_with_paged_adamw_8bit_on_gpu(tmp_path, tiny_llama, lm_data, monkeypatch):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    import trainers.recipe as recipe

    seen = {}
    original = recipe.cleanup

    def cleanup(trial):   # what the trial trained with, read before cleanup drops it
        seen["optimizer"] = trial.engine.optimizer
        seen["autocast"] = "forward" in vars(trial.peft_model)   # kernels.enable_autocast wraps the forward
        original(trial)

    monkeypatch.setattr(recipe, "cleanup", cleanup)
    settings = lm_settings(tiny_llama, lm_data, "lora", quantization="nf4", optimizer="paged_adamw_8bit")
    reports = []
    final = run_trial(settings, reports.append, str(tmp_path))
    assert math.isfinite(final["eval_loss"]) and final["eval_loss"] < reports[0]["eval_loss"] + 1e-6
    assert isinstance(seen["optimizer"], bitsandbytes.optim.PagedAdamW8bit)
    assert seen["autocast"] == torch.cuda.is_bf16_supported()   # QLoRA's bf16 mixed precision by default


def test_fp16_lora_trial_on_gpu(tmp_path, tiny_bert, cls_data):
    settings = cls_settings(tiny_bert, cls_data, "lora", epochs=4)
    settings = replace(settings, model=replace(settings.model, dtype="float16"))
    reports = []
    final = run_trial(settings, reports.append, str(tmp_path))   # loss-scaled (PlainEngine's GradScaler)
    assert final["eval_accuracy"] >= 0.65 and final["eval_loss"] < reports[0]["eval_loss"]


class Stopped(Exception):
    """Stands for ASHA stopping a trial in its report."""


def _stop(metrics):
    raise Stopped


def test_gpu_memory_returns_to_the_base_level_after_each_trial(tmp_path, tiny_llama, lm_data):
    settings = lm_settings(tiny_llama, lm_data, "lora", epochs=2)
    base = load_base(settings.model)
    # a first trial allocates what stays for the process (cuBLAS workspaces); the level is taken after it
    run_trial(replace(settings, training=replace(settings.training, max_steps=1)), lambda m: None,
              str(tmp_path / "warm"), base=base)
    gc.collect()
    level = torch.cuda.memory_allocated()
    run_trial(settings, lambda m: None, str(tmp_path / "finished"), base=base)
    assert torch.cuda.memory_allocated() == level
    # stopped in its first report, or failed inside a step, with the exception still held (as pytest.raises
    # holds it): the failed step's frame would keep its activations alive if the recipe did not clear it
    with pytest.raises(Stopped) as stopped:
        run_trial(settings, _stop, str(tmp_path / "stopped"), base=base)
    assert stopped.value is not None and torch.cuda.memory_allocated() == level
    diverging = replace(settings, training=replace(settings.training, learning_rate=1e9, warmup_ratio=0.0))
    with pytest.raises(TrialFailed, match="diverged") as failed:
        run_trial(diverging, lambda m: None, str(tmp_path / "failed"), base=base)
    assert failed.value is not None and torch.cuda.memory_allocated() == level
    reports = []
    run_trial(settings, reports.append, str(tmp_path / "next"), base=base)   # the next trial on the same base
    assert len(reports) == 2 and torch.cuda.memory_allocated() == level


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_over_nccl(tmp_path, tiny_bert, cls_data, stage):
    pytest.importorskip("deepspeed")
    from test_deepspeed import _run_group

    settings = replace(cls_settings(tiny_bert, cls_data, "lora", epochs=2),
                       engine=EngineSettings(deepspeed=True, zero_stage=stage))
    (reports,) = _run_group(tmp_path, [settings], world_size=1, cpu=False)
    assert [r["round"] for r in reports[0]] == [1, 2] and reports[0][-1]["adapter_mb"] > 0
