"""The recipe on a CUDA GPU: bf16, NF4 QLoRA, DeepSpeed over NCCL, CUDA memory and NVML energy figures."""
import importlib.util
import math
from dataclasses import replace

import pytest
import torch

from trainers.model import load_base
from trainers.recipe import run_trial
from trainers.settings import EngineSettings
from trainers_helpers import cls_settings, lm_settings

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


def test_qlora_nf4_on_gpu(tmp_path, tiny_llama, lm_data):
    pytest.importorskip("bitsandbytes")
    reports = []
    final = run_trial(lm_settings(tiny_llama, lm_data, "lora", quantization="nf4"), reports.append, str(tmp_path))
    assert math.isfinite(final["eval_loss"]) and final["eval_loss"] < reports[0]["eval_loss"] + 1e-6


def test_deepspeed_zero2_over_nccl(tmp_path, tiny_bert, cls_data):
    pytest.importorskip("deepspeed")
    from test_deepspeed import _run_group

    settings = replace(cls_settings(tiny_bert, cls_data, "lora", epochs=2),
                       engine=EngineSettings(deepspeed=True, zero_stage=2))
    (reports,) = _run_group(tmp_path, [settings], world_size=1, cpu=False)
    assert [r["round"] for r in reports[0]] == [1, 2] and reports[0][-1]["adapter_mb"] > 0
