"""Which modules an adapter targets, per architecture (`config.model_type`), and checks against a model.

Presets follow published practice: BERT-like `query,value` (the LoRA paper's q,v); LLaMA-like
`q_proj,k_proj,v_proj,o_proj` (all attention projections, QLoRA adds the MLP); GPT-2 `c_attn`
(fused qkv, a transformers Conv1D); Falcon `query_key_value`; GPT-NeoX `query_key_value,dense`.
Architectures not listed fall back to PEFT's own tables. IA3 presets give the target modules and
the feed-forward subset (whose *input* IA3 rescales).

Names match the way PEFT matches them: a target `t` selects a module whose full name is `t` or
ends in `.t` (so `output.dense` and `mlp.c_proj` work as in PEFT's IA3 tables).

Torch is imported only by functions that receive an nn.Module.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

# BERT's module names (attention.self.query/key/value, intermediate.dense, output.dense)
_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "layoutlm", "ernie",
              "megatron-bert", "data2vec-text")
_LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
               "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "smollm3", "cohere")
_LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]

# model_type -> LoRA targets (attention), and the MLP modules added by `include_mlp`
LORA_PRESETS: Dict[str, List[str]] = {
    **{model_type: ["query", "value"] for model_type in _BERT_LIKE},
    "albert": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    **{model_type: list(_LLAMA_ATTENTION) for model_type in _LLAMA_LIKE},
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "falcon": ["query_key_value"],
    "gpt_neox": ["query_key_value", "dense"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "t5": ["q", "v"],
}
MLP_PRESETS: Dict[str, List[str]] = {
    **{model_type: list(_LLAMA_MLP) for model_type in _LLAMA_LIKE},
    "mixtral": ["w1", "w2", "w3"],
    **{model_type: ["intermediate.dense", "output.dense"] for model_type in _BERT_LIKE},
    "gpt2": ["c_fc", "mlp.c_proj"],
    "falcon": ["dense_h_to_4h", "dense_4h_to_h"],
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
    "phi3": ["gate_up_proj", "down_proj"],
}
# model_type -> (IA3 target modules, feed-forward subset of them)
IA3_PRESETS: Dict[str, Tuple[List[str], List[str]]] = {
    **{model_type: (["key", "value", "output.dense"], ["output.dense"]) for model_type in _BERT_LIKE},
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    **{model_type: (["k_proj", "v_proj", "down_proj"], ["down_proj"]) for model_type in _LLAMA_LIKE},
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
}
# Output heads: never adapted by "all-linear" (PEFT leaves the output layer alone too).
_HEADS = ("classifier", "score", "lm_head", "qa_outputs", "embed_out")


class UnknownArchitecture(KeyError):
    """No preset for this model_type; the message says what to write instead."""

    def __str__(self) -> str:
        return str(self.args[0])


def _peft_table(name: str) -> Mapping[str, Any]:
    try:
        from peft.utils import constants
    except ImportError:  # peft is a core dependency; stay usable without it for the presets above
        return {}
    return getattr(constants, name, {})


def preset_target_modules(model_type: str, method: str, include_mlp: bool = False) -> List[str]:
    """The preset target modules of `method` ("lora" or "ia3") for `model_type`."""
    if method == "ia3":
        return list(_ia3_preset(model_type)[0])
    if method != "lora":
        raise ValueError(f"{method} has no target modules")
    targets = LORA_PRESETS.get(model_type)
    if targets is None:
        fallback = _peft_table("TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING").get(model_type)
        if not isinstance(fallback, list):  # PEFT gives a regex for a few models; those need a list from the user
            raise UnknownArchitecture(
                f"no target-module preset for model type {model_type!r}; "
                f"give peft.target_modules as a list of module names")
        targets = fallback
    targets = list(targets)
    if include_mlp:
        targets += [name for name in MLP_PRESETS.get(model_type, []) if name not in targets]
    return targets


def preset_feedforward_modules(model_type: str) -> List[str]:
    """IA3's feed-forward modules for `model_type` (a subset of its target modules)."""
    return list(_ia3_preset(model_type)[1])


def _ia3_preset(model_type: str) -> Tuple[List[str], List[str]]:
    if model_type in IA3_PRESETS:
        return IA3_PRESETS[model_type]
    targets = _peft_table("TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING").get(model_type)
    feedforward = _peft_table("TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING").get(model_type)
    if not isinstance(targets, list) or not isinstance(feedforward, list):
        raise UnknownArchitecture(
            f"no IA3 preset for model type {model_type!r}; give peft.target_modules and "
            f"peft.feedforward_modules as lists of module names")
    return targets, feedforward


def _model_type(model: Any) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(f"{type(model).__name__} has no config.model_type; give target modules as a list")
    return model_type


def default_target_modules(model: Any, method: str, include_mlp: bool = False) -> List[str]:
    """Preset target modules for a loaded model (reads `model.config.model_type`)."""
    return preset_target_modules(_model_type(model), method, include_mlp=include_mlp)


def default_feedforward_modules(model: Any) -> List[str]:
    """IA3's preset feed-forward modules for a loaded model."""
    return preset_feedforward_modules(_model_type(model))


def linear_layers(model: Any) -> Dict[str, Tuple[int, int]]:
    """Full module name -> (in_features, out_features) of every nn.Linear and GPT-2 Conv1D of `model`.

    Quantized linears (bitsandbytes) subclass nn.Linear and are included; meta-device models work.
    """
    import torch
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a core dependency
        Conv1D = ()
    layers: Dict[str, Tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[name] = (int(module.in_features), int(module.out_features))
        elif Conv1D and isinstance(module, Conv1D):  # weight is (in, out): the transpose of nn.Linear
            layers[name] = (int(module.nx), int(module.nf))
    return layers


def _as_layers(source: Any) -> Dict[str, Optional[Tuple[int, int]]]:
    """Name -> (in, out) (or None where unknown) from a model, a ModelShape, a mapping or names."""
    if hasattr(source, "named_modules"):
        return dict(linear_layers(source))
    layers = getattr(source, "layers", source)
    if isinstance(layers, Mapping):
        return {name: (tuple(shape) if shape is not None else None) for name, shape in layers.items()}
    return {name: None for name in layers}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _is_head(name: str) -> bool:
    return name.split(".")[-1] in _HEADS or name.split(".")[0] in _HEADS


def matching_layers(source: Any, requested: Any) -> List[str]:
    """Full names of the layers `requested` (a list of names, or "all-linear") selects."""
    layers = _as_layers(source)
    if requested == "all-linear":
        return [name for name in layers if not _is_head(name)]
    targets = [requested] if isinstance(requested, str) else list(requested)
    return [name for name in layers if any(_matches(name, target) for target in targets)]


def leaf_names(source: Any) -> List[str]:
    """Distinct last parts of the layer names (what users write in target_modules), sorted."""
    return sorted({name.split(".")[-1] for name in _as_layers(source) if name})


def check_target_modules(module_names_or_model: Any, requested: Any) -> List[str]:
    """One message per requested module that matches no linear layer, naming the ones there are.

    `module_names_or_model`: an nn.Module, a ModelShape, a mapping name -> (in, out), or names.
    `requested`: a list of module names, "all-linear", or "auto" (always fine: a preset).
    """
    if requested in ("auto", "all-linear"):
        return []
    layers = _as_layers(module_names_or_model)
    targets = [requested] if isinstance(requested, str) else list(requested)
    missing = [target for target in targets if not any(_matches(name, target) for name in layers)]
    if not missing:
        return []
    have = ", ".join(leaf_names(layers)) or "none"
    return [f"the model has no linear layer named {target!r}; its linear layers are: {have}" for target in missing]


def smallest_dimension(module_names_or_model: Any, requested: Any) -> Optional[int]:
    """min(in, out) over the targeted layers (the largest useful LoRA rank), None if nothing matches."""
    layers = _as_layers(module_names_or_model)
    dims = [min(layers[name]) for name in matching_layers(layers, requested) if layers[name] is not None]
    return min(dims) if dims else None
