"""The DeepSpeed path: ZeRO-2 / ZeRO-3 on CPU with gloo, in fresh processes (as Ray Train workers would be).

DeepSpeed keeps process-wide state (its comm backend, the accelerator), so each group runs in its
own subprocesses rather than inside the test process. The 2-worker group runs once for the module
(`two_workers`), and each test reads what it needs from it.
"""
import json
from dataclasses import replace
from pathlib import Path

import pytest
from peft import PeftModel
from trainers_helpers import BERT_PARAMS, cls_settings, lm_settings
from transformers import AutoModelForSequenceClassification

from ranks import run_ranks
from trainers.recipe import run_trial
from trainers.settings import EngineSettings, PeftSettings
from trainers.settings_io import settings_to_dict

pytest.importorskip("deepspeed")
WORKER = Path(__file__).with_name("deepspeed_worker.py")
# 2 workers at half the batch see, step by step, the same 16 rows as 1 worker (DistributedSampler and the
# 1-worker RandomSampler draw the same permutation) and average their gradients: the same trajectory up
# to float summation order. Classification losses are means over rows, so the ranks' mean is the global
# one; a causal LM's loss is a mean over each rank's tokens, so there the two differ a little more.
# Seen: 2e-7 (classification), 4e-4 (NF4 causal LM); training moves either eval loss by about 0.1.
SAME_ROWS_TOLERANCE = 1e-4
TOKEN_MEAN_TOLERANCE = 5e-3


def _run_group(tmp_path, jobs, world_size, cpu=True):
    """Run `jobs` (TrialSettings, or (TrialSettings, {"stop_after_round": N, "resume": K})) on `world_size`
    ranks; returns each rank's reports, a list per job."""
    paths = []
    for index, job in enumerate(jobs):
        settings, options = job if isinstance(job, tuple) else (job, {})
        path = tmp_path / f"job{index}.json"
        path.write_text(json.dumps({"settings": settings_to_dict(settings), **options}))
        paths.append(str(path))
    for end in run_ranks([WORKER, *paths, tmp_path], world_size, timeout=600, cpu=cpu):
        assert end.returncode == 0, end.output[-4000:]
    return [json.loads((tmp_path / f"reports-{rank}.json").read_text())["reports"] for rank in range(world_size)]


def _ds(settings, stage, deepspeed=True, **engine):
    return replace(settings, engine=EngineSettings(deepspeed=deepspeed, zero_stage=stage, num_threads=1, **engine))


def _no_dropout(settings, params):
    return replace(settings, peft=PeftSettings("lora", {**params, "lora_dropout": 0.0}))


def test_zero2_and_zero3_train_report_and_save_in_one_process(tmp_path, tiny_bert, cls_data):
    base = cls_settings(tiny_bert, cls_data, "lora", epochs=2, gradient_accumulation_steps=2)
    # the user's own JSON adds a key of its own and leaves precision to the spec ("auto")
    user = {"zero_optimization": {"reduce_bucket_size": 500000}, "bf16": {"enabled": "auto"}}
    zero2 = _ds(base, 2, offload_optimizer="cpu", user_config=user)
    zero3 = _ds(base, 3, offload_optimizer="cpu", offload_param="cpu")
    # the third trial: the same group without DeepSpeed (plain torch path under DDP) as the reference
    (reports,) = _run_group(tmp_path, [zero2, zero3, _ds(base, 0, deepspeed=False)], world_size=1)
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

    written = [json.loads((tmp_path / f"trial{index}" / "deepspeed.json").read_text()) for index in (0, 1)]
    assert written[0]["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 500000,
                                               "offload_optimizer": {"device": "cpu"},
                                               "offload_param": {"device": "none"}}
    assert written[0]["bf16"] == {"enabled": False} and written[0]["fp16"] == {"enabled": False}   # fp32 on CPU
    assert (written[0]["train_micro_batch_size_per_gpu"], written[0]["gradient_accumulation_steps"],
            written[0]["train_batch_size"], written[0]["gradient_clipping"]) == (16, 2, 32, 1.0)
    assert written[1]["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert not (tmp_path / "trial2" / "deepspeed.json").exists()   # the plain path has no DeepSpeed config


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, tiny_bert, cls_data, tiny_llama, lm_data):
    """One 2-rank group running every multi-worker job; per job: settings, each rank's reports, its directory."""
    out = tmp_path_factory.mktemp("two_workers")
    cls = _no_dropout(cls_settings(tiny_bert, cls_data, "lora", epochs=2, batch_size=8), BERT_PARAMS["lora"])
    nf4 = lm_settings(tiny_llama, lm_data, "lora", quantization="nf4", epochs=2, batch_size=8)
    nf4 = _no_dropout(nf4, nf4.peft.params)
    jobs = {
        "zero2": _ds(cls, 2),
        "zero3": _ds(cls, 3),
        "zero3-stopped": (_ds(cls, 3), {"stop_after_round": 1}),
        "zero3-resumed": (_ds(cls, 3), {"resume": 2}),
        "nf4-zero3": _ds(nf4, 3),
        # lr 0 plateaus after round 1
        "plateau": _ds(cls_settings(tiny_bert, cls_data, "lora", epochs=3, learning_rate=0.0,
                                    early_stopping_patience=1), 3),
    }
    rank0, rank1 = _run_group(out, list(jobs.values()), world_size=2)
    return {name: {"settings": job[0] if isinstance(job, tuple) else job, "rank0": rank0[index],
                   "rank1": rank1[index], "dir": out / f"trial{index}"}
            for index, (name, job) in enumerate(jobs.items())}


def _one_worker(settings, tmp_path):
    """The same trial on 1 worker at twice the per-worker batch (the plain path, this process)."""
    reports = []
    training = replace(settings.training, batch_size=2 * settings.training.batch_size)
    run_trial(replace(settings, training=training), reports.append, str(tmp_path))
    return reports


def test_ranks_report_the_same_metrics_the_same_number_of_times(two_workers):
    for name, job in two_workers.items():
        assert job["rank0"] == job["rank1"], name


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_workers_reach_the_one_worker_metric(two_workers, tmp_path, stage):
    job = two_workers[stage]
    single = _one_worker(job["settings"], tmp_path)
    two = job["rank0"]
    # 192 train rows: 1 worker x 16 rows or 2 workers x 8 rows a step, 12 steps an epoch
    assert [r["step"] for r in two] == [r["step"] for r in single] == [12, 24]
    for key in ("eval_loss", "train_loss"):
        assert two[-1][key] == pytest.approx(single[-1][key], abs=SAME_ROWS_TOLERANCE), key
    assert abs(two[-1]["eval_accuracy"] - single[-1]["eval_accuracy"]) <= 1 / 48   # one of the 48 eval rows
    assert (job["dir"] / "adapter" / "adapter_model.safetensors").is_file()


def test_zero3_trial_stopped_in_a_report_resumes_to_the_unbroken_result(two_workers):
    unbroken, stopped, resumed = (two_workers[name]["rank0"] for name in ("zero3", "zero3-stopped", "zero3-resumed"))
    assert [r["round"] for r in stopped] == [1] and [r["round"] for r in resumed] == [2]
    assert stopped[0]["eval_loss"] == pytest.approx(unbroken[0]["eval_loss"], abs=1e-6)
    for key in ("eval_loss", "eval_accuracy", "train_loss", "step"):
        assert resumed[-1][key] == pytest.approx(unbroken[-1][key], abs=1e-5), key
    checkpoint = two_workers["zero3-stopped"]["dir"] / "checkpoint" / "round-0002"
    # DeepSpeed's checkpoint: each rank's ZeRO partition of the optimizer state
    assert len(list((checkpoint / "engine").glob("*optim_states.pt"))) == 2


def test_nf4_zero3_two_workers_on_cpu(two_workers, tmp_path):
    job = two_workers["nf4-zero3"]
    single = _one_worker(job["settings"], tmp_path)
    two = job["rank0"]
    assert two[-1]["eval_loss"] < two[0]["eval_loss"]
    assert two[-1]["eval_loss"] == pytest.approx(single[-1]["eval_loss"], abs=TOKEN_MEAN_TOLERANCE)


def test_zero3_ranks_stop_together_and_report_the_same_diagnostics(two_workers):
    stopped, full = two_workers["plateau"]["rank0"], two_workers["zero3"]["rank0"]
    assert [r["round"] for r in stopped] == [1, 2] and stopped[-1]["rounds_total"] == 2
    assert stopped[-1]["stopped_early"].startswith("plateau: eval_loss did not improve")
    assert stopped[-1]["diag_effective_rank"] == 0.0   # B never moved from zero
    # the trained trial's LoRA weights are partitioned across the two ranks, gathered for the figures
    assert 0.0 < full[-1]["diag_effective_rank"] <= 4.0 and "diag_overfit_gap" in full[-1]


ZERO3_LOAD_PROBE = """
import json, sys, torch, torch.distributed as dist
from trainers.engine import zero3_load_config
from trainers.model import load_base
from trainers.settings_io import settings_from_dict
dist.init_process_group("gloo")
found = {}
for name, path in zip(("bert", "nf4"), sys.argv[1:]):
    settings = settings_from_dict(json.load(open(path)))
    base = load_base(settings.model, num_labels=2 if name == "bert" else None,
                     zero3_config=zero3_load_config(settings, torch.device("cpu")))
    weight = base.model.get_submodule("model.layers.0.self_attn.q_proj" if name == "nf4"
                                      else "bert.encoder.layer.0.attention.self.query").weight
    found[name] = {"partitioned": hasattr(weight, "ds_id"), "local_numel": weight.numel(),
                   "class": type(weight).__name__, "dtype": str(weight.dtype)}
    del base
print(json.dumps(found))
dist.destroy_process_group()
"""


def test_zero3_base_is_partitioned_while_it_loads_and_nf4_is_stored_in_the_compute_dtype(tmp_path, tiny_bert, cls_data,
                                                                                           tiny_llama, lm_data):
    paths = []
    for name, settings in (("bert", cls_settings(tiny_bert, cls_data)), ("nf4", lm_settings(tiny_llama, lm_data,
                                                                                           quantization="nf4"))):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(settings_to_dict(_ds(settings, 3))))
        paths.append(str(path))
    (end,) = run_ranks(["-c", ZERO3_LOAD_PROBE, *paths], 1, timeout=600)
    assert end.returncode == 0, end.output[-4000:]
    found = json.loads([line for line in end.output.splitlines() if line.startswith("{")][-1])
    # ZeRO-3 init: the weights arrive partitioned (this rank's data is the empty placeholder)
    assert found["bert"]["partitioned"] and found["bert"]["local_numel"] == 0
    # transformers never ZeRO-3-inits a quantized model; its packed 4-bit weights are stored in the compute
    # dtype (fp32 on CPU) instead of uint8, so that DeepSpeed can partition them with the rest
    assert found["nf4"] == {"partitioned": False, "local_numel": found["nf4"]["local_numel"], "class": "Params4bit",
                            "dtype": "torch.float32"}
