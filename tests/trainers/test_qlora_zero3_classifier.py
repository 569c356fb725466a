"""QLoRA (nf4) on a BERT-like classifier, alone and under ZeRO-3 on 2 ranks.

A classifier's new head is missing from a pretrained checkpoint. transformers turns each layer it quantizes into a
bitsandbytes layer before it reads the checkpoint, so a head it quantizes is initialised afterwards as a float weight
inside a bitsandbytes layer, whose forward cannot run it (`weight.shape[1] == 1`): the head must stay nn.Linear.

The 2-rank run also takes bitsandbytes' AVX512-BF16 layout decision on every CPU: where the CPU lacks AVX512-BF16
its detection is forced on for that run (no AVX512 instruction runs: the trial never repacks a weight, and a
repack would fail the run here), so the checks that the 4-bit weights keep their layout run everywhere.
"""
import json
from pathlib import Path

import pytest
import torch

from ranks import run_ranks
from trainers.hub import resolve_model_path
from trainers.settings import DataSettings, EngineSettings, ModelSettings, PeftSettings, TrainingSettings, TrialSettings
from trainers.settings_io import settings_to_dict
from trainers.tiny_models import make_learnable_classification_data

pytest.importorskip("bitsandbytes")
HERE = Path(__file__).resolve().parent

# One rank: bitsandbytes' AVX512-BF16 detection answers yes, every 4-bit repacking fails the trial, and Linear4bit
# counts its forwards in eval mode without gradients (where bitsandbytes repacks) and checks the layout after each.
RANK = r"""
import json, sys
import torch, torch.distributed as dist
import bitsandbytes.nn.modules as modules
from deepspeed_worker import run_job

native = bool(modules.has_avx512bf16())
modules.has_avx512bf16 = lambda: True
seen = {"native_avx512bf16": native, "eval_forwards": 0, "train_forwards": 0}

def refuse_repacking(*args, **kwargs):
    raise AssertionError("bitsandbytes repacked a 4-bit weight for its AVX512-BF16 kernel")

modules._convert_weight_packed_for_cpu = refuse_repacking
forward = modules.Linear4bit.forward

def checked_forward(self, x):
    evaluating = not self.training and not torch.is_grad_enabled()
    seen["eval_forwards" if evaluating else "train_forwards"] += 1
    out = forward(self, x)
    state = self.weight.quant_state
    assert self.weight.shape[1] == 1 and not getattr(state, "packing_format_for_cpu", False), self.weight.shape
    return out

modules.Linear4bit.forward = checked_forward
dist.init_process_group("gloo")
job, out = json.load(open(sys.argv[1])), sys.argv[2]
seen["reports"] = run_job(job, 0, out)
json.dump(seen, open(f"{out}/rank{dist.get_rank()}.json", "w"))
dist.destroy_process_group()
"""


def _minilm() -> str:
    try:
        return resolve_model_path("minilm")
    except ImportError as exc:
        pytest.skip(str(exc))


def _settings(data: str) -> TrialSettings:
    # two rounds: eval and checkpoint, then training again on the evaluated base, then eval, save and checkpoint
    return TrialSettings(
        model=ModelSettings("minilm", quantization="nf4"),
        data=DataSettings(data, max_length=16, eval_fraction=0.25),
        peft=PeftSettings("lora", {"r": 4, "target_modules": "auto", "lora_dropout": 0.0}),
        training=TrainingSettings(learning_rate=1e-3, epochs=1, evals_per_epoch=2, batch_size=4, max_steps=4),
        engine=EngineSettings(deepspeed=True, zero_stage=3, num_threads=1),
    )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The nf4 LoRA trial on MiniLM under ZeRO-3 on 2 ranks; per rank what RANK recorded, and the trial's directory."""
    _minilm()
    out = tmp_path_factory.mktemp("qlora_zero3")
    data = make_learnable_classification_data(str(out / "cls.jsonl"), n=48, seed=0)
    (out / "job.json").write_text(json.dumps({"settings": settings_to_dict(_settings(data))}))
    (out / "rank.py").write_text(RANK)
    for end in run_ranks([out / "rank.py", out / "job.json", out], 2, timeout=300, paths=[HERE]):
        assert end.returncode == 0, end.output[-4000:]
    return {"ranks": [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)],
            "dir": out / "trial0"}


def test_nf4_zero3_trains_the_minilm_classifier_on_two_ranks(two_ranks):
    rank0, rank1 = two_ranks["ranks"]
    assert rank0["reports"] == rank1["reports"]
    reports = rank0["reports"]
    assert [r["round"] for r in reports] == [1, 2] and reports[-1]["step"] == 4
    assert all(torch.isfinite(torch.tensor([r["eval_loss"], r["train_loss"]])).all() for r in reports)
    assert 0.0 <= reports[-1]["eval_accuracy"] <= 1.0 and reports[-1]["adapter_mb"] > 0
    from safetensors import safe_open

    with safe_open(str(two_ranks["dir"] / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    # the head trained in full and was saved unquantized: a float matrix of labels by hidden features
    assert [shape for key, shape in shapes.items() if key.endswith("classifier.weight")] == [(2, 384)]
    assert any("lora_A" in key for key in shapes)


def test_zero3_keeps_every_4bit_weight_in_its_layout_through_eval_and_checkpoints(two_ranks):
    for rank in two_ranks["ranks"]:
        # repacking would have failed the run (RANK); these say the evaluations it would have happened in ran
        assert rank["train_forwards"] > 0 and rank["eval_forwards"] > 0
    # each round was checkpointed (the first one is removed once the second is complete): ZeRO-3 partitions
    engine = two_ranks["dir"] / "checkpoint" / "round-0002" / "engine"
    assert len(list(engine.glob("*optim_states.pt"))) == 2


def test_avx512bf16_layout_decision_is_this_cpus_own(two_ranks):
    if not two_ranks["ranks"][0]["native_avx512bf16"]:
        pytest.skip("CPU lacks AVX512-BF16: its layout decision was forced on for the 2-rank run, and "
                    "bitsandbytes' AVX512-BF16 kernel is not exercised here; training took the generic path")
    assert all(rank["native_avx512bf16"] for rank in two_ranks["ranks"])


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_layers_the_checkpoint_lacks_stay_unquantized(tmp_path, tiny_bert, quantization):
    """A checkpoint without the head (as MiniLM's) and without a pooler: both load as nn.Linear and train."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainers.model import apply_adapter, load_base

    full = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    kept = {key: value for key, value in full.state_dict().items()
            if not key.startswith(("bert.pooler.", "classifier."))}
    full.save_pretrained(str(tmp_path), state_dict=kept)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(str(tmp_path))
    base = load_base(ModelSettings(str(tmp_path), quantization=quantization), num_labels=2)
    model = base.model
    assert type(model.classifier) is torch.nn.Linear and type(model.bert.pooler.dense) is torch.nn.Linear
    assert type(model.bert.encoder.layer[0].attention.self.query).__name__ in ("Linear4bit", "Linear8bitLt")
    peft_model = apply_adapter(base, PeftSettings("lora", {"r": 4, "target_modules": ["query", "value"]}))
    encoded = base.tokenizer(["good movie", "bad plot"], padding=True, return_tensors="pt")
    loss = peft_model(**encoded, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert torch.isfinite(loss)
    trained = {name: param for name, param in peft_model.named_parameters() if param.requires_grad}
    assert all(param.grad is not None for param in trained.values())
    assert any("classifier" in name for name in trained) and any("lora_A" in name for name in trained)
