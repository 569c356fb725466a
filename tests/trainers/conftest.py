"""Tiny models and learnable data, built once per session in a temporary directory."""
from __future__ import annotations

import pytest
import torch

from trainers.tiny_models import (build_tiny_causal_lm, build_tiny_classifier, make_learnable_classification_data,
                                  make_learnable_lm_data)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # The recipe sets torch's thread count from EngineSettings.num_threads (process-wide).
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_bert(tiny_dir):
    return build_tiny_classifier(str(tiny_dir / "bert"), num_labels=2, seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    return build_tiny_causal_lm(str(tiny_dir / "llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_dir):
    return build_tiny_causal_lm(str(tiny_dir / "gpt2"), arch="gpt2", seed=0)


@pytest.fixture(scope="session")
def cls_data(tiny_dir):
    return make_learnable_classification_data(str(tiny_dir / "cls.jsonl"), n=240, seed=0)


@pytest.fixture(scope="session")
def lm_data(tiny_dir):
    return make_learnable_lm_data(str(tiny_dir / "lm.jsonl"), n=160, seed=0)
