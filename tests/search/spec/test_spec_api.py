"""What a valid spec gives the search: the Optuna space, decoded trial values, TrialSettings, spec.yaml."""
from __future__ import annotations

import math

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from test_spec_helpers import DELETE, base_spec, merged, tiny_world, write_spec  # noqa: F401 (fixture)

from search.spec.search_spec import SearchSpec, SpecError, load_spec, parse_spec
from search.spec.sections import DataSection, ModelSection, SearchSection
from trainers.settings import TrialSettings

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _load(world, tmp_path, overrides=None, **kwargs):
    return load_spec(write_spec(tmp_path, merged(base_spec(world), overrides or {})), **kwargs)


def test_search_space_uses_optuna_names(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"space.r": {"power_of_two": [1, 32]}})
    space = spec.search_space()
    assert space == {
        "r_log2": IntDistribution(0, 5),
        "alpha_ratio": CategoricalDistribution([1.0, 2.0]),
        "learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
    }


def test_sampled_trials_decode_and_build_settings(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"space.r": {"power_of_two": [1, 32]}, "space.lora_dropout": {"low": 0.0, "high": 0.2}})
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    for _ in range(8):
        trial = study.ask(spec.search_space())
        values = spec.decode(trial.params)
        assert set(values) == {"r", "alpha_ratio", "learning_rate", "lora_dropout", "lora_alpha"}
        assert values["r"] in (1, 2, 4, 8, 16, 32)
        assert values["lora_alpha"] == values["alpha_ratio"] * values["r"]
        assert 1e-5 <= values["learning_rate"] <= 1e-3 and 0.0 <= values["lora_dropout"] <= 0.2
        settings = spec.trial_settings(trial.params)
        assert isinstance(settings, TrialSettings)
        assert settings.peft.params["r"] == values["r"]
        assert settings.peft.params["lora_alpha"] == values["lora_alpha"]
        assert settings.peft.params["target_modules"] == ["query", "value"]   # "auto" resolved for bert
        assert "alpha_ratio" not in settings.peft.params                      # not a PEFT argument
        assert settings.training.learning_rate == values["learning_rate"]
        assert settings.training.epochs == 2 and settings.training.batch_size == 8   # fixed in training:
        study.tell(trial, values["r"])
    assert spec.param_names() == ["r", "alpha_ratio", "learning_rate", "lora_dropout", "lora_alpha"]


def test_defaults_fill_what_is_not_searched(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"space": {"learning_rate": [1e-4, 1e-3]}})
    settings = spec.trial_settings({"learning_rate": 1e-3})
    assert settings.peft.params == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["query", "value"],
                                    "use_rslora": False, "use_dora": False}
    assert spec.decode({"learning_rate": 1e-3}) == {"learning_rate": 1e-3}
    assert settings.training.warmup_ratio == 0.05 and settings.data.max_length == 32
    assert settings.data.label_field == "label" and settings.data.split_seed == 0

    assert settings.engine.host_memory_mb is None   # no cap unless asked


def test_memory_cap_reaches_the_workers_in_mib(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"resources": {"memory_per_worker_gb": 1.5}})
    assert spec.trial_settings({}).engine.host_memory_mb == 1536


def test_empty_params_give_the_default_point(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path)
    assert spec.default_params() == {"learning_rate": 2e-4, "r": 8, "alpha_ratio": 2.0} or \
        spec.default_params() == {"r": 8, "alpha_ratio": 2.0, "learning_rate": 2e-4}
    assert spec.trial_settings({}).peft.params["r"] == 8
    with pytest.raises(KeyError, match="no sampled value for 'learning_rate'"):
        spec.trial_settings({"r": 8, "alpha_ratio": 2.0})


def test_ratio_to_on_lora_alpha(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"space.alpha_ratio": DELETE, "space.lora_alpha": {"ratio_to": "r", "ratio": [0.5, 4]}})
    assert "lora_alpha_ratio" in spec.search_space()
    values = spec.decode({"r": 8, "lora_alpha_ratio": 4.0, "learning_rate": 1e-4})
    assert values["lora_alpha"] == 32 and values["lora_alpha_ratio"] == 4.0


def test_lora_alpha_given_directly_is_kept(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"space.alpha_ratio": DELETE, "peft.lora_alpha": 16})
    assert spec.trial_settings({"r": 4, "learning_rate": 1e-4}).peft.params["lora_alpha"] == 16


def test_searched_target_module_sets(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"peft.target_modules": DELETE,
                                        "space.target_modules": [["query", "value"], ["query", "key", "value", "dense"]]})
    params = {"r": 4, "alpha_ratio": 1.0, "learning_rate": 1e-4, "target_modules": "query,key,value,dense"}
    assert spec.trial_settings(params).peft.params["target_modules"] == ["query", "key", "value", "dense"]


def test_prompt_tuning_settings(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"peft": {"method": "prompt-tuning", "prompt_init_text": "Is this positive:"},
                                        "space": {"num_virtual_tokens": [5, 10], "prompt_init": ["random", "text"]}})
    settings = spec.trial_settings({"num_virtual_tokens": 10, "prompt_init": "text"})
    assert settings.peft.params == {"num_virtual_tokens": 10, "prompt_init": "text", "prompt_init_text": "Is this positive:"}


def test_ia3_auto_modules_are_resolved(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"peft": {"method": "ia3"}, "space": {"learning_rate": [1e-3, 1e-2]}})
    params = spec.trial_settings({"learning_rate": 1e-3}).peft.params
    assert params == {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}


def test_max_rounds(tiny_world, tmp_path):
    assert _load(tiny_world, tmp_path, {"search.evals_per_epoch": 3}).max_rounds == 6
    spec = _load(tiny_world, tmp_path, {"training.epochs": DELETE, "space.epochs": [1, 4], "search.evals_per_epoch": 2})
    assert spec.max_rounds == 8


def test_grid(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"search.algorithm": "grid", "space": {"r": {"power_of_two": [2, 8]},
                                                                                "learning_rate": [1e-4, 1e-3]}})
    assert spec.grid() == {"r_log2": [1, 2, 3], "learning_rate": [1e-4, 1e-3]}


def test_objective_defaults_follow_the_task(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"objective": DELETE})
    assert (spec.objective.metric, spec.objective.mode) == ("eval_accuracy", "max")
    spec = _load(tiny_world, tmp_path, {"objective.mode": DELETE, "objective.metric": ["eval_loss", "adapter_mb"],
                                        "search.scheduler": "none", "search.algorithm": "nsga2"})
    assert spec.objective.metric == ("eval_loss", "adapter_mb") and spec.objective.mode == ("min", "min")


def test_storage_urls(tiny_world, tmp_path):
    for url in ("sqlite", f"sqlite:///{tmp_path}/study.db", "postgresql://user:pw@db.example:5432/peft",
                "postgresql+psycopg2://user:pw@db.example/peft"):
        assert _load(tiny_world, tmp_path, {"storage": url}, check_files=False, check_model=False).storage == url
    with pytest.raises(SpecError, match="storage: a postgresql URL needs a host and a database name"):
        _load(tiny_world, tmp_path, {"storage": "postgresql://user@/"}, check_files=False, check_model=False)
    with pytest.raises(SpecError, match="storage: directory .* does not exist"):
        _load(tiny_world, tmp_path, {"storage": "sqlite:////no/such/dir/study.db"})


def test_redaction(tiny_world, tmp_path):
    spec = _load(tiny_world, tmp_path, {"storage": "postgresql://bob:hunter2@db.example/peft",
                                        "tracking.api_key": "wandb-secret-key"}, check_files=False)
    redacted = yaml.safe_dump(spec.to_dict())
    assert "hunter2" not in redacted and "wandb-secret-key" not in redacted
    assert spec.to_dict()["storage"] == "postgresql://bob:***@db.example/peft"
    assert spec.to_dict()["tracking"]["api_key"] == "***"
    assert spec.to_dict(redact=False)["storage"] == "postgresql://bob:hunter2@db.example/peft"


@pytest.mark.parametrize("overrides", [
    {},
    {"space.r": {"power_of_two": [1, 32]}, "space.lora_dropout": {"low": 0.0, "high": 0.2}},
    {"peft": {"method": "prompt-tuning", "prompt_init_text": "Go:"}, "space": {"prompt_init": ["text", "random"]}},
    {"space.alpha_ratio": DELETE, "space.lora_alpha": {"ratio_to": "r", "ratio": [1, 2]}, "resources.deepspeed": False},
    {"space.max_length": [16, 32], "data.max_length": DELETE},
])
def test_to_dict_loads_back_to_the_same_spec(tiny_world, tmp_path, overrides):
    spec = _load(tiny_world, tmp_path, overrides)
    again = parse_spec(yaml.safe_load(yaml.safe_dump(spec.to_dict(redact=False))), str(tmp_path))
    assert again.to_dict(redact=False) == spec.to_dict(redact=False)
    assert again.search_space() == spec.search_space()


def test_sections_validate_at_construction():
    with pytest.raises(SpecError, match=r"search\.trials: must be >= 1, got 0"):
        SearchSection(trials=0)
    with pytest.raises(SpecError) as caught:
        SearchSpec(name="bad name", model=ModelSection("minilm"), data=DataSection("train.jsonl", label_field="label"),
                   space={})
    assert [problem.split(":")[0] for problem in caught.value.problems] == ["name", "space"]


def test_yaml_floats_without_a_dot(tiny_world, tmp_path):
    text = yaml.safe_dump(merged(base_spec(tiny_world), {"space.learning_rate": DELETE})) + "\n"
    text = text.replace("training:\n", "training:\n  learning_rate: 1e-4\n")
    spec = load_spec(write_spec(tmp_path, None, text=text))
    assert math.isclose(spec.training.learning_rate, 1e-4)
