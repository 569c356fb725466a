"""Model checks of a spec: trainers.inspect builds the model on the meta device (no weights read)."""
from __future__ import annotations

import pytest
from test_spec_helpers import DELETE, base_spec, merged, tiny_world, write_spec  # noqa: F401 (fixture)

from search.spec.search_spec import SpecError, load_spec
from trainers.inspect import ModelReferenceError, inspect_model


def test_inspect_tiny_classifier(tiny_world):
    shape = inspect_model(tiny_world["classifier"], "sequence-classification")
    assert (shape.model_type, shape.hidden_size, shape.max_position_embeddings) == ("bert", 64, 256)
    assert shape.layers["bert.encoder.layer.0.attention.self.query"] == (64, 64)
    assert {"query", "key", "value", "dense", "classifier"} == set(shape.leaf_names)
    assert sorted(shape.leaf_shapes()["dense"]) == [(64, 64), (64, 128), (128, 64)]


def test_inspect_gpt2_conv1d(tiny_world):
    shape = inspect_model(tiny_world["gpt2"], "causal-lm")
    assert shape.model_type == "gpt2" and shape.layers["transformer.h.0.attn.c_attn"] == (64, 192)


def test_inspect_the_minilm_alias():
    shape = inspect_model("minilm", "sequence-classification")
    assert (shape.model_type, shape.hidden_size, shape.vocab_size) == ("bert", 384, 30522)


@pytest.mark.parametrize("reference, message", [
    ("./no/such/model", "is not an existing directory"),
    ("nobody/not-cached-anywhere", "not in the local HF cache"),
])
def test_inspect_errors(reference, message, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelReferenceError, match=message):
        inspect_model(reference, "causal-lm")


def test_inspect_directory_without_config(tmp_path):
    with pytest.raises(ModelReferenceError, match="has no config.json"):
        inspect_model(str(tmp_path), "causal-lm")


def _causal(world, arch, overrides):
    base = merged(base_spec(world), {"model.name_or_path": world[arch], "model.task": "causal-lm",
                                     "data.label_field": DELETE, "objective": DELETE})
    return merged(base, overrides)


def test_llama_presets_and_rank_limit(tiny_world, tmp_path):
    spec = load_spec(write_spec(tmp_path, _causal(tiny_world, "llama", {})))
    params = spec.trial_settings({"r": 4, "alpha_ratio": 2.0, "learning_rate": 1e-4}).peft.params
    assert params["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert spec.objective.metric == "eval_loss" and spec.objective.mode == "min"
    # k_proj / v_proj have 2 kv heads of 16: out_features 32
    with pytest.raises(SpecError, match=r"space\.r: rank must be <= 32, the smallest dimension .* got 64"):
        load_spec(write_spec(tmp_path, _causal(tiny_world, "llama", {"space.r": {"power_of_two": [1, 64]}})))


def test_gpt2_preset(tiny_world, tmp_path):
    spec = load_spec(write_spec(tmp_path, _causal(tiny_world, "gpt2", {})))
    assert spec.trial_settings({"r": 4, "alpha_ratio": 1.0, "learning_rate": 1e-4}).peft.params["target_modules"] == ["c_attn"]
    with pytest.raises(SpecError, match="its linear layers are: c_attn, c_fc, c_proj, lm_head"):
        load_spec(write_spec(tmp_path, _causal(tiny_world, "gpt2", {"peft.target_modules": ["q_proj"]})))
