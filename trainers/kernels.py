"""Speed options of a trial (ModelSettings fields), applied when the base loads and when an adapter is added.

    attn_implementation     transformers' attention kernel (None: its own choice, SDPA where the model has it)
    liger_kernel            Liger's Triton kernels: RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy,
                            which never materialises the (tokens x vocabulary) logits in training
    autocast                forward under torch.autocast in the compute dtype, adapter weights kept in fp32
                            (None: on for nf4/int8 in bf16/fp16, QLoRA's recipe)
    gradient_checkpointing  recompute activations in backward (None: on for nf4/int8 only, QLoRA's recipe)
    compile                 torch.compile each transformer block (regional: compiles one block's code once)

Each is off by default where it changes the rounding or needs a package that is not a core dependency;
a missing package is an ImportError naming the option and the install command.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, List

import torch

from trainers.settings import ATTN_IMPLEMENTATIONS, ModelSettings

# attention implementation -> (module to import, pip package)
_ATTN_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "flash-attn (hopper build)")}
_FLAGS = ("liger_kernel", "compile")


def speed_problems(model: ModelSettings) -> List[str]:
    """One line per invalid speed option, naming its key path (for spec validation and load time)."""
    problems = []
    attn = model.attn_implementation
    if attn is not None and attn not in ATTN_IMPLEMENTATIONS:
        problems.append(f"model.attn_implementation: must be one of {list(ATTN_IMPLEMENTATIONS)} or unset, "
                        f"got {attn!r}")
    for name in _FLAGS:
        if not isinstance(getattr(model, name), bool):
            problems.append(f"model.{name}: must be true or false, got {getattr(model, name)!r}")
    for name in ("autocast", "gradient_checkpointing"):
        if getattr(model, name) not in (None, True, False):
            problems.append(f"model.{name}: must be true, false or unset, got {getattr(model, name)!r}")
    if model.dtype == "float16" and model.autocast is False:
        problems.append("model.autocast: float16 trains under autocast (fp32 trained weights, fp16 compute, loss "
                        "scaling; fp16 weights would lose their updates); leave it unset or true, got false")
    return problems


def from_pretrained_kwargs(model: ModelSettings) -> Dict[str, Any]:
    """Keyword arguments for `from_pretrained` (the attention kernel is chosen when the model is built)."""
    problems = speed_problems(model)
    if problems:
        raise ValueError("\n".join(problems))
    kwargs: Dict[str, Any] = {}
    if model.attn_implementation is not None:
        module, package = _ATTN_PACKAGES.get(model.attn_implementation, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise ImportError(f"model.attn_implementation={model.attn_implementation} needs {package}: "
                              f"pip install {package.split()[0]}")
        kwargs["attn_implementation"] = model.attn_implementation
    return kwargs


def wants_checkpointing(model: ModelSettings) -> bool:
    if model.gradient_checkpointing is None:
        return model.quantization != "none"
    return bool(model.gradient_checkpointing)


def wants_autocast(model: ModelSettings, dtype: torch.dtype) -> bool:
    """Unset: on for a quantized base computing in bf16/fp16. QLoRA trains under mixed precision (bf16
    autocast); without it, prepare_model_for_kbit_training's fp32 upcast runs the whole forward in fp32.
    Always on for fp16, which trains only as mixed precision (fp32 trained weights, see prepare_adapter)."""
    if dtype == torch.float32:
        return False
    if dtype == torch.float16:
        return True
    if model.autocast is None:
        return model.quantization != "none"
    return bool(model.autocast)


def prepare_base(loaded, model: ModelSettings, dtype: torch.dtype):
    """Speed options that belong to the base model; called after from_pretrained (and kbit preparation),
    before an adapter wraps it (Liger patches the modules PEFT will wrap)."""
    if model.liger_kernel:
        apply_liger(loaded, fused_cross_entropy_only=model.compile)
    if wants_checkpointing(model) and model.quantization == "none":
        # prepare_model_for_kbit_training does this for quantized models. Non-reentrant checkpointing
        # needs no gradient on the (frozen) embedding output.
        loaded.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if wants_autocast(model, dtype) and model.quantization != "none":
        # prepare_model_for_kbit_training upcasts every unquantized weight to fp32. Under autocast the
        # frozen embeddings and output head would be cast down again at every use (the head once per
        # chunk of the fused cross-entropy) and fp32 copies cost 2x their memory; norms stay fp32.
        for module in (loaded.get_input_embeddings(), loaded.get_output_embeddings()):
            if module is not None:
                module.to(dtype)
    return loaded


def prepare_adapter(peft_model, model: ModelSettings, dtype: torch.dtype, device: torch.device):
    """Speed options that need the adapter's layers; called right after get_peft_model (training only)."""
    config = peft_model.get_base_model().config
    prompt_learning = getattr(getattr(peft_model, "active_peft_config", None), "is_prompt_learning", False)
    if getattr(config, "use_cache", None) and not prompt_learning:   # prefix tuning feeds its prefix as a cache
        # Training never reads a KV cache, and building one copies every layer's keys and values and keeps
        # them alive into the next step. (Not set at load time: a merged export would save it.)
        config.use_cache = False
    if dtype == torch.float16:
        # fp16 has too few mantissa bits to take small updates, and loss scaling unscales only fp32
        # gradients: the trained weights (a classification head too, not only PEFT's adapters) train in fp32.
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if wants_autocast(model, dtype):
        enable_autocast(peft_model, device.type, dtype)
    if model.compile:
        compile_blocks(peft_model)
    return peft_model


def apply_liger(loaded, fused_cross_entropy_only: bool = False) -> None:
    """Patch this model instance with Liger's kernels for its architecture (model-type generic).

    `fused_cross_entropy_only` (with `compile`): Inductor fuses the norms, RoPE and SwiGLU of a compiled
    block itself, and Liger's Triton kernels inside a compiled block fail to trace (seen on an H100 with
    torch 2.11); the fused linear cross-entropy sits outside the blocks and keeps its memory saving.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("model.liger_kernel: Liger's kernels are Triton kernels and need a CUDA GPU")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise ImportError("model.liger_kernel needs liger-kernel: pip install liger-kernel") from exc
    model_type = loaded.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"model.liger_kernel: Liger has no kernels for model type {model_type!r}; "
                         f"it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}")
    # Liger's defaults: RoPE, RMSNorm, SwiGLU and the fused linear cross-entropy (which only runs when
    # the model computes the loss from `labels`, as the recipe's causal-LM batches do).
    blocks = {"rope": False, "rms_norm": False, "swiglu": False} if fused_cross_entropy_only else {}
    _apply_liger_kernel_to_instance(model=loaded, **blocks)


def enable_autocast(peft_model, device_type: str, dtype: torch.dtype) -> None:
    """Run the model's forward under autocast (as accelerate's mixed precision does) and stop PEFT from
    casting each adapter's input to the fp32 of its weights: those casts are kept for backward, one fp32
    copy of the activations per adapted module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    # An instance attribute wins over the class's forward for nn.Module.__call__ (and DeepSpeed's engine).
    peft_model.forward = torch.autocast(device_type=device_type, dtype=dtype)(peft_model.forward)


def compile_blocks(peft_model) -> int:
    """torch.compile each repeated transformer block in place; returns how many were compiled.

    Compiling block by block (torchtune's and transformers' regional compilation) compiles the block's code
    once for all layers, in seconds rather than the minutes a whole-model graph takes, and leaves the
    embedding, the loss and PEFT's wrapper in eager mode.
    """
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    block_types = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [module for module in base.modules() if type(module).__name__ in block_types
              and isinstance(module, torch.nn.Module)]
    if not blocks:
        raise ValueError(f"model.compile: {type(base).__name__} declares no transformer block type "
                         "(_no_split_modules), so there is nothing to compile block by block")
    for block in blocks:
        block.compile()
    return len(blocks)
