"""Shared helpers for the spec tests: a valid base spec over a tiny model and tiny data, with overrides.

(Named test_spec_* so it sits with the spec tests; it holds no tests itself.)
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict

import pytest
import yaml

from trainers.tiny_models import build_tiny_causal_lm, build_tiny_classifier, make_learnable_classification_data

DELETE = object()  # an override value that removes the key


_BUILT: Dict[str, str] = {}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Dict[str, str]:
    """A tiny BERT classifier (hidden size 64), a tiny llama, a tiny gpt2, and classification data.

    Each test module imports this fixture (and so defines its own copy); the models are built once."""
    if _BUILT:
        return dict(_BUILT)
    root = tmp_path_factory.mktemp("tiny_world")
    _BUILT.update({
        "classifier": build_tiny_classifier(str(root / "bert")),
        "llama": build_tiny_causal_lm(str(root / "llama"), arch="llama"),
        "gpt2": build_tiny_causal_lm(str(root / "gpt2"), arch="gpt2"),
        "train": make_learnable_classification_data(str(root / "train.jsonl"), 40, seed=0),
        "eval": make_learnable_classification_data(str(root / "eval.jsonl"), 10, seed=1),
    })
    return dict(_BUILT)


def base_spec(world: Dict[str, str]) -> Dict[str, Any]:
    return {
        "name": "unit-test",
        "model": {"name_or_path": world["classifier"], "task": "sequence-classification"},
        "data": {"train": world["train"], "eval": world["eval"], "text_field": "text", "label_field": "label",
                 "max_length": 32},
        "peft": {"method": "lora", "target_modules": "auto"},
        "space": {"r": [1, 2, 4, 8], "alpha_ratio": [1, 2], "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}},
        "training": {"epochs": 2, "batch_size": 8},
        "objective": {"metric": "eval_accuracy", "mode": "max"},
        "search": {"algorithm": "tpe", "trials": 4, "concurrency": 1, "scheduler": "asha"},
        "resources": {"workers_per_trial": 1, "gpus_per_worker": 0},
        "storage": "sqlite",
        "tracking": {"wandb": "disabled"},
    }


def merged(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """`base` with `overrides` applied; keys are dotted paths ("space.r"), DELETE removes a key."""
    out = copy.deepcopy(base)
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return out


def write_spec(tmp_path, data: Any, text: str = None) -> str:
    path = os.path.join(str(tmp_path), "spec.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    return path
