"""The method registry and the published defaults of each parameter."""
from __future__ import annotations

import pytest

from spaces import methods
from spaces.kinds import KindError
from spaces.methods import TRAINING_PARAMS, Method, Param, get_method, method_names, params_for, register_method


def test_the_four_methods_are_registered():
    assert set(method_names()) >= {"lora", "prompt-tuning", "prefix-tuning", "ia3"}


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(KeyError, match="known methods are: lora, prompt-tuning"):
        get_method("lorax")


@pytest.mark.parametrize("method, name, default", [
    ("lora", "r", 8),
    ("lora", "alpha_ratio", 2.0),          # lora_alpha = 2r
    ("lora", "lora_dropout", 0.05),
    ("lora", "target_modules", "auto"),
    ("lora", "use_rslora", False),
    ("lora", "use_dora", False),
    ("prompt-tuning", "num_virtual_tokens", 20),
    ("prompt-tuning", "prompt_init", "random"),
    ("prefix-tuning", "num_virtual_tokens", 20),
    ("ia3", "target_modules", "auto"),
    ("ia3", "feedforward_modules", "auto"),
    ("lora", "learning_rate", 2e-4),
    ("lora", "warmup_ratio", 0.05),
    ("lora", "max_length", 128),
])
def test_defaults_follow_published_practice(method, name, default):
    assert params_for(method)[name].default == default


def test_methods_do_not_share_method_parameters():
    assert "r" not in get_method("prompt-tuning").params
    assert "num_virtual_tokens" not in get_method("lora").params
    assert set(TRAINING_PARAMS) <= set(params_for("ia3"))


def test_register_method_is_lazy(monkeypatch):
    monkeypatch.setattr(methods, "_FACTORIES", dict(methods._FACTORIES))
    monkeypatch.setattr(methods, "_BUILT", {})
    calls = []

    def factory():
        calls.append(1)
        return Method("toy", {"k": Param("k", "int", 4, "k", home="peft", low=1)})

    register_method("toy", factory)
    assert calls == [] and "toy" in method_names()
    assert get_method("toy").params["k"].default == 4
    get_method("toy")
    assert calls == [1]


@pytest.mark.parametrize("param, value, message", [
    ("r", 0, "rank must be >= 1, got 0"),
    ("lora_alpha", 0.0, "lora_alpha must be > 0"),
    ("lora_dropout", 1.0, "dropout must be < 1"),
    ("lora_dropout", -0.1, "dropout must be >= 0"),
])
def test_lora_checks(param, value, message):
    assert message in get_method("lora").params[param].check(value)


def test_learning_rate_must_be_positive():
    assert "learning rate must be > 0, got 0" in TRAINING_PARAMS["learning_rate"].check(0)


@pytest.mark.parametrize("param, value, message", [
    ("r", "8", "rank must be an integer, got '8' (str)"),
    ("r", True, "rank must be an integer"),
    ("use_dora", "yes", "must be true or false"),
    ("target_modules", [], "non-empty list of module names"),
])
def test_wrong_types_are_named(param, value, message):
    with pytest.raises(KindError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_method("lora").params[param].coerce(value)


def test_float_strings_from_yaml_are_read_as_numbers():
    assert TRAINING_PARAMS["learning_rate"].coerce("1e-4") == 1e-4
