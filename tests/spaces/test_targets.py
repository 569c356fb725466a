"""Target-module presets per architecture, and checks of requested modules against a model."""
from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, FalconConfig,
                          GPT2Config, GPTNeoXConfig, LlamaConfig)

from spaces.targets import (UnknownArchitecture, check_target_modules, default_feedforward_modules,
                            default_target_modules, leaf_names, linear_layers, preset_target_modules,
                            smallest_dimension)

SMALL = dict(num_hidden_layers=1, num_attention_heads=4, vocab_size=50)


def _meta(auto_class, config):
    with torch.device("meta"):
        return auto_class.from_config(config)


@pytest.fixture(scope="module")
def bert():
    return _meta(AutoModelForSequenceClassification, BertConfig(hidden_size=32, intermediate_size=64, **SMALL))


@pytest.fixture(scope="module")
def llama():
    return _meta(AutoModelForCausalLM, LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **SMALL))


@pytest.fixture(scope="module")
def gpt2():
    return _meta(AutoModelForCausalLM, GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50))


@pytest.mark.parametrize("model_type, expected", [
    ("bert", ["query", "value"]),
    ("roberta", ["query", "value"]),
    ("distilbert", ["q_lin", "v_lin"]),
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("mistral", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("gpt2", ["c_attn"]),
    ("falcon", ["query_key_value"]),
    ("gpt_neox", ["query_key_value", "dense"]),
    ("bart", ["q_proj", "v_proj"]),   # not listed here: PEFT's own table
])
def test_lora_presets(model_type, expected):
    assert preset_target_modules(model_type, "lora") == expected


def test_mlp_is_optional_for_llama():
    assert preset_target_modules("llama", "lora", include_mlp=True)[-3:] == ["gate_proj", "up_proj", "down_proj"]


def test_unknown_architecture_says_what_to_do():
    with pytest.raises(UnknownArchitecture, match="give peft.target_modules as a list"):
        preset_target_modules("no_such_arch", "lora")


def test_default_target_modules_reads_the_model_type(bert, llama, gpt2):
    assert default_target_modules(bert, "lora") == ["query", "value"]
    assert default_target_modules(llama, "lora") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert default_target_modules(gpt2, "lora") == ["c_attn"]
    assert default_target_modules(bert, "ia3") == ["key", "value", "output.dense"]
    assert default_feedforward_modules(llama) == ["down_proj"]


@pytest.mark.parametrize("fixture", ["bert", "llama", "gpt2"])
def test_every_preset_exists_in_its_model(request, fixture):
    model = request.getfixturevalue(fixture)
    for method in ("lora", "ia3"):
        assert check_target_modules(model, default_target_modules(model, method)) == []
    assert check_target_modules(model, default_feedforward_modules(model)) == []


@pytest.mark.parametrize("config", [FalconConfig(hidden_size=32, **SMALL), GPTNeoXConfig(hidden_size=32, intermediate_size=64, **SMALL)])
def test_falcon_and_neox_presets_exist(config):
    model = _meta(AutoModelForCausalLM, config)
    assert check_target_modules(model, default_target_modules(model, "lora")) == []


def test_missing_modules_name_the_ones_the_model_has(bert):
    problems = check_target_modules(bert, ["q_proj", "value"])
    assert problems == ["the model has no linear layer named 'q_proj'; its linear layers are: "
                        "classifier, dense, key, query, value"]


def test_names_alone_can_be_checked():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    assert check_target_modules(names, ["q_proj", "mlp.down_proj"]) == []
    assert "its linear layers are: down_proj, q_proj" in check_target_modules(names, ["v_proj"])[0]


def test_gpt2_conv1d_counts_as_linear(gpt2):
    layers = linear_layers(gpt2)
    assert layers["transformer.h.0.attn.c_attn"] == (32, 96)   # Conv1D: in 32, out 3 * 32
    assert "c_attn" in leaf_names(gpt2)


def test_smallest_dimension(bert, llama, gpt2):
    assert smallest_dimension(bert, ["query", "value"]) == 32
    assert smallest_dimension(llama, ["q_proj", "k_proj"]) == 16      # 2 kv heads of 8
    assert smallest_dimension(gpt2, ["c_attn"]) == 32
    assert smallest_dimension(bert, "all-linear") == 32               # the classifier head is left out
    assert smallest_dimension(bert, ["nothing"]) is None
