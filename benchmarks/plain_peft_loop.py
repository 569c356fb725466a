"""The baseline of the GPU benchmark: a plain HF transformers + PEFT loop, what a user writes without us.

It does what shared/anchors/gpu_peft_baseline.py does: a random-init LLaMA-shaped model in bf16 with SDPA
attention (values do not change system figures), LoRA with alpha 2r and no dropout on q/k/v/o_proj, torch
AdamW (lr 2e-4) over the adapter, and per step `model(input_ids=x, labels=x).loss.backward(); opt.step();
opt.zero_grad()` on one random batch. QLoRA loads the saved model with NF4, double quantization and bf16
compute through from_pretrained, and does nothing else to it (no prepare_model_for_kbit_training).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA3_VOCAB = 128256
# The anchor's shapes (Llama 3.2 1B and Llama 3.1 8B), and a tiny one for the CPU path and tests.
SHAPES: Dict[str, Dict[str, Any]] = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=LLAMA3_VOCAB),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=LLAMA3_VOCAB),
    # 64 wide: the smallest width bitsandbytes' 4-bit blocks tile, so the tiny model also runs NF4
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256),
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    return LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **SHAPES[shape])


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The random-init model, created directly on `device` in `dtype` (as the anchor does)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(default)
    return model


def flops_per_token(config, seq: int) -> float:
    """The anchor's count: forward 2N + input-gradient 2N over the linear layers (the frozen base gets no
    weight gradient), plus causal attention forward and backward."""
    d, layers, f = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    linear = layers * (d * d * 2 + d * kv * 2 + 3 * d * f) + d * config.vocab_size
    return 4 * linear + 6 * seq * d * layers


def add_lora(model, r: int):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def load_nf4(path: str, device: torch.device):
    """The saved model quantized to NF4 while it loads (the anchor's QLoRA base)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map=device_map,
                                                dtype=torch.bfloat16)


class PlainLoop:
    """The anchor's training step on one fixed random batch."""

    def __init__(self, peft_model, batch_size: int, seq: int, seed: int = 0, synchronize_each_step: bool = False):
        self.model = peft_model
        # A diagnostic variant: read the loss after the forward and wait for the step to finish, the two
        # host-device round trips our recipe makes per step (divergence check, gradient-norm clipping).
        self.synchronize_each_step = synchronize_each_step
        self.params = [param for param in peft_model.parameters() if param.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=2e-4)
        device = next(peft_model.parameters()).device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vocab = peft_model.get_base_model().config.vocab_size
        self.batch = torch.randint(0, vocab, (batch_size, seq), generator=generator).to(device)
        self.model.train()

    @property
    def trainable(self) -> int:
        return sum(param.numel() for param in self.params)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            loss = self.model(input_ids=self.batch, labels=self.batch).loss
            if self.synchronize_each_step:
                loss.item()
            loss.backward()
            if self.synchronize_each_step and loss.is_cuda:
                torch.cuda.synchronize()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
