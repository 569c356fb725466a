"""The DeepSpeed path: ZeRO-2 / ZeRO-3 on CPU with gloo, in fresh processes (as Ray Train workers would be).

DeepSpeed keeps process-wide state (its comm backend, the accelerator), so each group runs in its
own subprocesses rather than inside the test process.
"""
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from trainers.settings import EngineSettings
from trainers.settings_io import settings_to_dict
from trainers_helpers import cls_settings

pytest.importorskip("deepspeed")
WORKER = Path(__file__).with_name("deepspeed_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_group(tmp_path, settings_list, world_size, cpu=True):
    paths = []
    for index, settings in enumerate(settings_list):
        path = tmp_path / f"settings{index}.json"
        path.write_text(json.dumps(settings_to_dict(settings)))
        paths.append(str(path))
    port = _free_port()
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        if cpu:
            env.update({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})   # the CPU path, also beside a GPU
        else:
            env.pop("DS_ACCELERATOR", None)
        processes.append(subprocess.Popen([sys.executable, str(WORKER), *paths, str(tmp_path)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    return [json.loads((tmp_path / f"reports-{rank}.json").read_text())["reports"] for rank in range(world_size)]


def _ds(settings, stage, deepspeed=True):
    return replace(settings, engine=EngineSettings(deepspeed=deepspeed, zero_stage=stage, num_threads=1))


def test_zero2_and_zero3_train_report_and_save_in_one_process(tmp_path, tiny_bert, cls_data):
    base = cls_settings(tiny_bert, cls_data, "lora", epochs=2, gradient_accumulation_steps=2)
    # the third trial: the same group without DeepSpeed (plain torch path under DDP) as the reference
    (reports,) = _run_group(tmp_path, [_ds(base, 2), _ds(base, 3), _ds(base, 0, deepspeed=False)], world_size=1)
    *zero, plain = reports
    assert [r["round"] for r in plain] == [1, 2] and plain[-1]["eval_loss"] < plain[0]["eval_loss"]
    for index, trial in enumerate(zero):
        assert [r["round"] for r in trial] == [1, 2]
        assert trial[-1]["eval_loss"] < trial[0]["eval_loss"] and trial[-1]["adapter_mb"] > 0
        # same optimizer, schedule, clipping and accumulation as the plain path: the same trajectory
        assert [r["step"] for r in trial] == [r["step"] for r in plain]
        assert trial[-1]["eval_loss"] == pytest.approx(plain[-1]["eval_loss"], abs=1e-3)
        assert trial[-1]["trainable_params"] == plain[-1]["trainable_params"]
        adapter = tmp_path / f"trial{index}" / "adapter"
        reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert),
                                             str(adapter))
        assert sum(p.numel() for n, p in reloaded.named_parameters() if "lora_" in n) > 0


def test_two_ranks_report_identical_metrics(tmp_path, tiny_bert, cls_data):
    settings = _ds(cls_settings(tiny_bert, cls_data, "lora", epochs=1, evals_per_epoch=2), 2)
    rank0, rank1 = _run_group(tmp_path, [settings], world_size=2)
    assert rank0 == rank1
    # 192 train rows shared by 2 ranks at 16 rows a batch: 6 steps, each rank sees its own half
    assert [r["step"] for r in rank0[0]] == [3, 6]
    assert (tmp_path / "trial0" / "adapter" / "adapter_model.safetensors").is_file()


def test_zero3_ranks_stop_together_and_report_the_same_diagnostics(tmp_path, tiny_bert, cls_data):
    # lr 0 plateaus after round 1; the trained trial's LoRA weights are partitioned across the two ranks
    plateau = _ds(cls_settings(tiny_bert, cls_data, "lora", epochs=3, learning_rate=0.0, early_stopping_patience=1), 3)
    trained = _ds(cls_settings(tiny_bert, cls_data, "lora", epochs=1), 3)
    rank0, rank1 = _run_group(tmp_path, [plateau, trained], world_size=2)
    assert rank0 == rank1
    stopped, full = rank0
    assert [r["round"] for r in stopped] == [1, 2] and stopped[-1]["rounds_total"] == 2
    assert stopped[-1]["stopped_early"].startswith("plateau: eval_loss did not improve")
    assert stopped[-1]["diag_effective_rank"] == 0.0   # B never moved from zero
    assert 0.0 < full[-1]["diag_effective_rank"] <= 4.0 and "diag_overfit_gap" in full[-1]
