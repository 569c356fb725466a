"""The GPU throughput benchmark's CPU path, and the speed options (trainers/kernels.py) it measures."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import gpu_throughput  # noqa: E402
from trainers.kernels import speed_problems, wants_checkpointing  # noqa: E402
from trainers.model import apply_adapter, load_base  # noqa: E402
from trainers.settings import ModelSettings, PeftSettings  # noqa: E402

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def test_cpu_path_writes_both_arms_and_their_ratios(tmp_path):
    out = tmp_path / "gpu_throughput_cpu.json"
    qlora_ranks = "8" if HAS_BNB else ""
    gpu_throughput.main(["--device", "cpu", "--tiny", "--lora-ranks", "8", "--qlora-ranks", qlora_ranks,
                         "--batch", "2", "--seq", "16", "--warmup", "1", "--steps", "1", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert summary["device"] == "cpu" and summary["batch"] == 2 and summary["seq"] == 16
    assert summary["targets"] == []           # the targets are GPU figures
    methods = {(row["model"], row["method"], row["r"]) for row in summary["rows"]}
    expected = {("llama-tiny", "lora-bf16", 8)} | ({("llama-tiny", "qlora-nf4", 8)} if HAS_BNB else set())
    assert methods == expected
    for row in summary["rows"]:
        plain, ours = row["arms"]["plain"], row["arms"]["ours"]
        for figures in (plain, ours):
            assert "error" not in figures, figures
            assert set(gpu_throughput.METRICS) <= set(figures)
            assert figures["tokens_per_s"] > 0 and figures["peak_gib"] > 0 and figures["step_s"] > 0
        # the same adapter on both sides: LoRA at r on q/k/v/o_proj
        assert plain["trainable"] == ours["trainable"] > 0
        assert row["ratios"]["ours"]["tokens_per_s"] == round(ours["tokens_per_s"] / plain["tokens_per_s"], 3)
        assert row["ratios"]["ours"]["peak_gib"] == round(ours["peak_gib"] / plain["peak_gib"], 3)
        assert row["ratios"]["ours"]["mfu"] is None    # no peak FLOP/s is known for a CPU


def test_over_budget_configurations_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "skipped.json"
    gpu_throughput.main(["--device", "cpu", "--tiny", "--lora-ranks", "8", "--qlora-ranks", "",
                         "--budget-s", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [sorted(row["arms"]) for row in rows] == [["ours", "plain"]]
    assert all(figures == {"skipped": "over --budget-s"} for figures in rows[0]["arms"].values())


def test_markdown_and_targets_read_the_rows():
    rows = [{"model": "llama-8b", "method": "lora-bf16", "r": 8,
             "arms": {"plain": {"tokens_per_s": 100.0, "mfu": 0.4, "peak_gib": 40.0, "j_per_ktok": 2.0},
                      "ours": {"tokens_per_s": 120.0, "mfu": 0.48, "peak_gib": 30.0, "j_per_ktok": 1.5}}},
            {"model": "llama-8b", "method": "qlora-nf4", "r": 8,
             "arms": {"plain": {"tokens_per_s": 100.0, "mfu": 0.3, "peak_gib": 36.0, "j_per_ktok": 2.0},
                      "ours": {"tokens_per_s": 90.0, "mfu": 0.27, "peak_gib": 25.0, "j_per_ktok": 2.2}}}]
    for row in rows:
        row["ratios"] = {"ours": gpu_throughput.ratios(row["arms"]["plain"], row["arms"]["ours"])}
    assert rows[0]["ratios"]["ours"] == {"tokens_per_s": 1.2, "mfu": 1.2, "peak_gib": 0.75, "j_per_ktok": 0.75}
    met = {target["target"]: target["met"] for target in gpu_throughput.targets(rows)}
    assert met == {"ours never slower than plain (tokens/s ratio >= 1 on every row)": False,
                   "8B LoRA r=8 MFU >= 0.45": True, "8B LoRA r=8 peak <= 35 GiB": True,
                   "8B QLoRA r=8 peak <= 26 GiB": True, "8B QLoRA r=8 tokens/s >= plain": False}
    table = gpu_throughput.markdown({"device": "x", "batch": 8, "seq": 512, "steps": 8, "rows": rows,
                                     "arms": {"plain": None, "ours": {}}, "targets": gpu_throughput.targets(rows)})
    assert "| llama-8b | lora-bf16 | 8 | 100 | 120 (1.2) |" in table and "NOT MET" in table


def test_parse_options_knows_only_the_speed_fields():
    assert gpu_throughput.parse_options("liger_kernel=true, compile=0,gradient_checkpointing=none,"
                                        "attn_implementation=sdpa") == {
        "liger_kernel": True, "compile": False, "gradient_checkpointing": None, "attn_implementation": "sdpa"}
    with pytest.raises(ValueError, match="unknown speed option 'ligerkernel'"):
        gpu_throughput.parse_options("ligerkernel=true")


# --- the speed options themselves (trainers/kernels.py) ---

def test_speed_option_problems_name_the_key():
    problems = speed_problems(ModelSettings("m", attn_implementation="flash", compile="yes",
                                            gradient_checkpointing="auto"))
    assert [problem.split(":")[0] for problem in problems] == [
        "model.attn_implementation", "model.compile", "model.gradient_checkpointing"]
    assert wants_checkpointing(ModelSettings("m", quantization="nf4"))          # QLoRA's recipe by default
    assert not wants_checkpointing(ModelSettings("m"))
    assert not wants_checkpointing(ModelSettings("m", quantization="nf4", gradient_checkpointing=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_liger_without_a_gpu_is_a_clear_error(tiny_llama):
    with pytest.raises(RuntimeError, match="model.liger_kernel: .*CUDA GPU"):
        load_base(ModelSettings(tiny_llama, task="causal-lm", liger_kernel=True))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_its_package_is_a_clear_error(tiny_llama):
    with pytest.raises(ImportError, match="model.attn_implementation=flash_attention_2 needs flash-attn"):
        load_base(ModelSettings(tiny_llama, task="causal-lm", attn_implementation="flash_attention_2"))


def test_autocast_keeps_fp32_adapter_weights_and_bf16_activations(tiny_llama):
    base = load_base(ModelSettings(tiny_llama, task="causal-lm", dtype="bfloat16", autocast=True),
                     device=torch.device("cpu"))
    peft_model = apply_adapter(base, PeftSettings("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}))
    lora_layers = [module for name, module in peft_model.named_modules() if name.endswith("q_proj")]
    assert lora_layers and all(not layer.cast_input_dtype_enabled for layer in lora_layers)
    seen = []
    hook = lora_layers[0].lora_A["default"].register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    ids = torch.randint(0, 40, (2, 8))
    outputs = peft_model(input_ids=ids, labels=ids)
    hook.remove()
    assert seen == [torch.bfloat16]           # PEFT did not cast the adapter's input to fp32
    outputs.loss.backward()
    trainable = [param for param in peft_model.parameters() if param.requires_grad]
    assert trainable and all(param.dtype == torch.float32 for param in trainable)
    assert all(param.grad is not None and torch.isfinite(param.grad).all() for param in trainable)
    assert base.model.config.use_cache is False   # training builds no KV cache


def test_gradient_checkpointing_option_reaches_an_unquantized_model(tiny_llama):
    base = load_base(ModelSettings(tiny_llama, task="causal-lm", gradient_checkpointing=True),
                     device=torch.device("cpu"))
    assert base.model.is_gradient_checkpointing
    plain = load_base(ModelSettings(tiny_llama, task="causal-lm"), device=torch.device("cpu"))
    assert not plain.model.is_gradient_checkpointing


def test_compile_wraps_each_decoder_block(tiny_llama):
    base = load_base(ModelSettings(tiny_llama, task="causal-lm", compile=True), device=torch.device("cpu"))
    peft_model = apply_adapter(base, PeftSettings("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}))
    layers = peft_model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert peft_model.get_base_model().model.norm._compiled_call_impl is None   # only the repeated blocks
