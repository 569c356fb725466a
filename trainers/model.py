"""Load a base model once, add an adapter per trial, take it off again.

`load_base` is the expensive part (weights from disk, quantization); it is kept apart from
`apply_adapter` / `release_adapter` so that a worker can load the base once and run many trials
on it, each trial adding its adapter and removing it afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from trainers.data import CLASSIFICATION, TOKEN_CLASSIFICATION
from trainers.hub import resolve_model_path
from trainers.kernels import from_pretrained_kwargs, prepare_adapter, prepare_base, wants_checkpointing
from trainers.settings import DTYPES, QUANTIZATIONS, TASKS, ModelSettings, PeftSettings, TrialSettings

# The heads PEFT trains in full on a classifier (its SEQ_CLS / TOKEN_CLS modules_to_save, matched as name suffixes).
CLASSIFIER_HEADS = ("classifier", "score")
# Tasks with a classification head of num_labels outputs (one per label, or per tag).
LABELLED_TASKS = (CLASSIFICATION, TOKEN_CLASSIFICATION)


@dataclass
class LoadedBase:
    model: Any                       # a transformers PreTrainedModel, frozen adapters aside
    tokenizer: Any
    model_type: str                  # config.model_type, e.g. "bert", "llama"
    task: str                        # sequence-classification | causal-lm | token-classification
    path: str                        # the resolved local directory or hub id
    dtype: torch.dtype               # compute dtype of the frozen weights
    quantization: str                # none | nf4 | int8
    device: torch.device
    num_labels: Optional[int] = None
    settings: Optional[ModelSettings] = None   # what it was loaded with; its speed options reach the adapter
    # ZeRO-3 init: the HfDeepSpeedConfig the base was partitioned under while it loaded. transformers and
    # PEFT treat the model as ZeRO-3 partitioned (gathering weights where they read them) while it lives.
    zero3_scope: Any = None

    @property
    def model_quantized(self) -> bool:
        return self.quantization != "none"


def compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs (trained with loss scaling), fp32 on CPU; explicit values win.

    fp16's range is narrower than bf16's: a model pretrained in bf16 can overflow in it (set float32 then)."""
    if requested not in DTYPES:
        raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {requested!r}")
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU bf16 matmuls are slow and lossy on most CPUs; fp32 is the CPU default.
    return torch.float32


def quantization_config(quantization: str, dtype: torch.dtype, zero3: bool = False,
                        skip_modules: Optional[Sequence[str]] = None):
    """A BitsAndBytesConfig for nf4 (QLoRA: double quantization, compute in `dtype`) or int8; None for none.

    `zero3`: ZeRO-3 partitions and gathers the weights as tensors of one float dtype, so the packed 4-bit
    weights are stored in the compute dtype (bnb_4bit_quant_storage) instead of uint8; int8 has no such option.
    `skip_modules`: modules left unquantized (names transformers matches as prefixes or suffixes). They replace
    transformers' own choice, which keeps the output head (lm_head) unquantized: None keeps that choice.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "none":
        return None
    if quantization == "int8" and zero3:
        raise ValueError("model.quantization: int8 cannot run under ZeRO-3 (bitsandbytes stores 8-bit weights "
                         "as int8 with their scales beside them, which ZeRO-3 cannot partition); use nf4, or "
                         "resources.deepspeed.zero_stage <= 2")
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; fail here with an install hint)
    except ImportError as exc:
        raise ImportError(f"model.quantization={quantization} needs bitsandbytes: "
                          "pip install 'peft-search[quantization]'") from exc
    from transformers import BitsAndBytesConfig

    skip = list(skip_modules) if skip_modules is not None else None
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype if zero3 else torch.uint8,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_base(model: ModelSettings, num_labels: Optional[int] = None,
              device: Optional[torch.device] = None, zero3_config: Optional[dict] = None) -> LoadedBase:
    """Tokenizer + base model on `device` (default: this rank's device), quantized if asked.

    `zero3_config`: the trial's DeepSpeed config when it trains under ZeRO-3. An unquantized base is then
    partitioned across the ranks while it loads (ZeRO-3 init: no rank ever holds the whole model); a 4-bit
    base is stored in the compute dtype, which ZeRO-3 needs (transformers never ZeRO-3-inits quantized
    models: each rank loads the 4-bit base, and DeepSpeed partitions it when the engine starts).
    Classification heads a checkpoint lacks are initialised from torch's RNG: seed before calling.
    """
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification, AutoTokenizer)

    from trainers.distributed import current_context

    if model.task not in TASKS:
        raise ValueError(f"model.task must be one of {list(TASKS)}, got {model.task!r}")
    if model.task in LABELLED_TASKS and not num_labels:
        raise ValueError(f"{model.task} needs num_labels (the number of distinct train labels or tags)")
    device = device or current_context().device
    dtype = compute_dtype(model.dtype, device)
    # A classifier's head trains in full (PEFT's modules_to_save), so it is never quantized. transformers' own
    # choice keeps the module of the model's last parameter unquantized but strips only ".weight" from its name:
    # a head whose last parameter is its bias ("classifier.bias") would be quantized.
    quantization = quantization_config(model.quantization, dtype, zero3=zero3_config is not None,
                                       skip_modules=CLASSIFIER_HEADS if model.task in LABELLED_TASKS else None)
    path = resolve_model_path(model.name_or_path)
    zero3_scope = _zero3_init_scope(zero3_config) if zero3_config is not None and quantization is None else None

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{model.name_or_path}: the tokenizer has neither a pad nor an eos token")
        # Decoder-only tokenizers (GPT-2, LLaMA) ship without a pad token; padded positions are masked
        # anyway, so reusing EOS avoids resizing the embeddings.
        tokenizer.pad_token = tokenizer.eos_token

    kwargs: dict = {"dtype": dtype, **from_pretrained_kwargs(model)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        # bitsandbytes quantizes while placing the weights, so the device is chosen at load time.
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    if model.task == CLASSIFICATION:
        loaded = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    elif model.task == TOKEN_CLASSIFICATION:
        loaded = AutoModelForTokenClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization is not None:
        _unquantized_layers_to_linear(loaded)
    if loaded.config.pad_token_id is None:
        # Decoder classifiers find each row's last token through the pad id.
        loaded.config.pad_token_id = tokenizer.pad_token_id
    if quantization is None:
        loaded.to(device)
    else:
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and enables input gradients + gradient checkpointing (QLoRA's recipe).
        loaded = prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=wants_checkpointing(model))
        _keep_4bit_layout(loaded)
    loaded = prepare_base(loaded, model, dtype)
    return LoadedBase(model=loaded, tokenizer=tokenizer, model_type=loaded.config.model_type, task=model.task,
                      path=path, dtype=dtype, quantization=model.quantization, device=device,
                      num_labels=num_labels if model.task in LABELLED_TASKS else None, settings=model,
                      zero3_scope=zero3_scope)


def _unquantized_layers_to_linear(model) -> None:
    """transformers swaps every nn.Linear it quantizes for a bitsandbytes layer before it reads the checkpoint,
    and quantizes each weight as it places it. A layer the checkpoint lacks (a pooler the pretrained model never
    had) is initialised afterwards with a float weight the bitsandbytes layer cannot run: its forward finds no
    quantization state and fails. Such a layer goes back to nn.Linear, holding the same parameters."""
    from bitsandbytes.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit

    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            quantized = Params4bit
        elif isinstance(module, Linear8bitLt):
            quantized = Int8Params
        else:
            continue
        if isinstance(module.weight, quantized):
            continue
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                 device="meta")
        linear.weight, linear.bias = module.weight, module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)


def _keep_4bit_layout(model) -> None:
    """Keep every 4-bit weight in the layout it was loaded in. On a CPU with AVX512-BF16, bitsandbytes repacks a
    4-bit weight in place for its CPU kernel the first time the layer runs in eval mode without gradients (here:
    each round's evaluation), and unpacks it again to save it. Under ZeRO-3, DeepSpeed has partitioned that weight
    by then, and the unpacking fails the trial's checkpoint ("packed_weight should be [N, K/2]"); a lent base
    must also reach the next trial as it was loaded. Evaluation then takes bitsandbytes' generic CPU path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):   # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False


def _zero3_init_scope(zero3_config: dict):
    """An HfDeepSpeedConfig: while it lives, from_pretrained loads under deepspeed.zero.Init (partitioned).

    DeepSpeed's own communication layer is set up on the trial's torch.distributed group first: zero.Init reads
    the world size from it, and before the first engine of a process has started it would count one rank (and
    refuse the batch size the config gives for all of them)."""
    import torch.distributed as dist

    from trainers.deepspeed_config import import_deepspeed

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(zero3_config)


def load_lent_base(settings: TrialSettings) -> LoadedBase:
    """The whole base a worker lends its trials (search/pool.BaseCache) or probes packs on (search/run/packing.py),
    with as many labels as the trial's train data holds, on this rank's device."""
    from trainers.data import read_trial_rows

    rows = read_trial_rows(settings.data, settings.model.task)
    return load_base(settings.model, num_labels=len(rows.labels) if rows.labels else None)


def load_base_for_adapter(name_or_path: str, task: str, adapter_dir: str, quantization: str = "none",
                          device: Optional[torch.device] = None) -> LoadedBase:
    """The base a saved adapter was trained on, e.g. to merge it (`peft-search export --merge`).

    A classification adapter carries its trained head (modules_to_save), whose rows give num_labels.
    """
    num_labels = _saved_num_labels(adapter_dir) if task in LABELLED_TASKS else None
    return load_base(ModelSettings(name_or_path, task=task, quantization=quantization), num_labels=num_labels or 2,
                     device=device)


def _saved_num_labels(adapter_dir: str) -> Optional[int]:
    import glob
    import os

    from safetensors import safe_open

    for path in glob.glob(os.path.join(adapter_dir, "*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                # BERT-like `classifier`, RoBERTa `classifier.out_proj`, decoder classifiers `score`
                if key.endswith(("classifier.weight", "classifier.out_proj.weight", "score.weight")):
                    return int(handle.get_slice(key).get_shape()[0])
    return None


def apply_adapter(base: LoadedBase, peft: PeftSettings, task: Optional[str] = None):
    """Wrap base.model in a fresh PEFT adapter (initialised from torch's RNG: seed before calling)."""
    from peft import get_peft_model

    from trainers.adapters import build_peft_config

    config = build_peft_config(peft, base.model, task or base.task, tokenizer_path=base.path)
    peft_model = get_peft_model(base.model, config)
    if base.settings is not None:
        prepare_adapter(peft_model, base.settings, base.dtype, base.device)
    return peft_model


def release_adapter(peft_model) -> Any:
    """Remove the adapter from `peft_model` and return the base model as it was before `apply_adapter`.

    PEFT's `unload()` alone is not enough: it keeps the *trained copy* of wrapped modules (the
    classification head under modules_to_save), and prompt-learning models have no `unload()`.
    So wrapped modules are first put back to their originals, then tuner layers are unloaded.
    """
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils.other import AuxiliaryTrainingWrapper

    inner = peft_model.base_model
    model = inner.model if isinstance(inner, BaseTuner) else inner
    wrapped = [name for name, module in model.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).original_module)
    if isinstance(inner, BaseTuner):
        model = inner.unload()
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
