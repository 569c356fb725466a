"""Look at a model reference without loading its weights: architecture, linear layers and sizes.

`peft-search validate` uses this to check target modules and ranks before anything starts. The
model is built from its config on the meta device, which allocates no memory and reads no weight
file, so even a 70B model takes a second or two. Nothing is downloaded: a hub id must already be in
the local HF cache.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from trainers.hub import MODEL_ALIASES, looks_like_local_path, resolve_model_path

_AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "token-classification": "AutoModelForTokenClassification",
}


class ModelReferenceError(ValueError):
    """A model reference that cannot be inspected; the message says why and what to do."""


@dataclass(frozen=True)
class ModelShape:
    """What the checks need to know about a model, all plain values (cheap to pickle)."""

    name_or_path: str
    model_type: str
    hidden_size: Optional[int]
    vocab_size: Optional[int]
    max_position_embeddings: Optional[int]
    # full module name -> (in_features, out_features) of every nn.Linear / GPT-2 Conv1D
    layers: Mapping[str, Tuple[int, int]] = field(default_factory=dict)
    # why PEFT cannot prefix-tune this model for its task with the installed libraries, or None
    prefix_tuning_problem: Optional[str] = None

    @property
    def leaf_names(self) -> List[str]:
        """Distinct last parts of the layer names (what target_modules lists), sorted."""
        return sorted({name.split(".")[-1] for name in self.layers})

    def leaf_shapes(self) -> Dict[str, List[Tuple[int, int]]]:
        """Leaf name -> the distinct (in, out) shapes of the layers with that name."""
        shapes: Dict[str, List[Tuple[int, int]]] = {}
        for name, shape in self.layers.items():
            bucket = shapes.setdefault(name.split(".")[-1], [])
            if shape not in bucket:
                bucket.append(shape)
        return shapes


def _config_value(config, *names: str) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    text_config = getattr(config, "text_config", None)  # multimodal configs nest the language model's
    if text_config is not None and text_config is not config:
        return _config_value(text_config, *names)
    return None


def load_config(name_or_path: str):
    """(local directory or hub id, transformers config) of a reference; ModelReferenceError otherwise."""
    from transformers import AutoConfig

    if name_or_path not in MODEL_ALIASES and looks_like_local_path(name_or_path) \
            and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ModelReferenceError(f"{name_or_path!r} is not an existing directory")
    try:
        reference = resolve_model_path(name_or_path)
    except ImportError as exc:   # an alias whose package is missing: the message says what to install
        raise ModelReferenceError(f"{name_or_path!r}: {exc}") from exc
    except Exception as exc:     # an alias converted on its first resolve (GGUF) can fail in many ways
        if name_or_path not in MODEL_ALIASES:
            raise
        raise ModelReferenceError(f"{name_or_path!r}: cannot prepare the alias ({type(exc).__name__}: {exc})") from exc
    if os.path.isdir(reference):
        if not os.path.isfile(os.path.join(reference, "config.json")):
            raise ModelReferenceError(
                f"{name_or_path!r} has no config.json (not a transformers model directory: "
                f"save one with model.save_pretrained(DIR))")
        try:
            return reference, AutoConfig.from_pretrained(reference)
        except Exception as exc:  # a broken config.json comes as ValueError, OSError, JSONDecodeError...
            raise ModelReferenceError(f"{name_or_path!r}: cannot read config.json ({type(exc).__name__}: {exc})") from exc
    try:
        return reference, AutoConfig.from_pretrained(reference, local_files_only=True)
    except Exception as exc:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
        raise ModelReferenceError(
            f"{name_or_path!r} is not a built-in alias ({', '.join(MODEL_ALIASES)}), not an existing directory, "
            f"and not in the local HF cache{offline}; download it first (huggingface-cli download "
            f"{name_or_path}) or give a local directory") from exc


@functools.lru_cache(maxsize=32)
def inspect_model(name_or_path: str, task: str) -> ModelShape:
    """The shape of the model `name_or_path` resolves to, built for `task` on the meta device.

    Raises ModelReferenceError for a missing directory, a directory without config.json, a hub id
    that is not cached locally, or an architecture that has no model class for `task`.
    """
    if task not in _AUTO_CLASSES:
        raise ModelReferenceError(f"task must be one of {', '.join(_AUTO_CLASSES)}, got {task!r}")
    reference, config = load_config(name_or_path)
    import torch
    import transformers

    from spaces.targets import linear_layers
    from trainers.adapters import prefix_tuning_problem

    auto_class = getattr(transformers, _AUTO_CLASSES[task])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # e.g. "use BertLMHeadModel with is_decoder=True"
    try:
        with torch.device("meta"):
            model = auto_class.from_config(config)
    except ValueError as exc:  # "Unrecognized configuration class ... for this kind of AutoModel"
        raise ModelReferenceError(
            f"{name_or_path!r} (model type {config.model_type!r}) has no {task} model class in transformers") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    return ModelShape(
        name_or_path=reference,
        model_type=config.model_type,
        hidden_size=_config_value(config, "hidden_size", "n_embd", "d_model"),
        vocab_size=_config_value(config, "vocab_size"),
        max_position_embeddings=_config_value(config, "max_position_embeddings", "n_positions"),
        layers=linear_layers(model),
        prefix_tuning_problem=prefix_tuning_problem(model, task),
    )
