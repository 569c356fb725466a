"""Every rejection of INTERFACE.md's spec, each problem naming its key path, all problems at once."""
from __future__ import annotations

import os

import pytest
from test_spec_helpers import DELETE, base_spec, merged, tiny_world, write_spec  # noqa: F401 (fixture)

from search.spec.search_spec import SpecError, load_spec

PROMPT = {"peft.method": "prompt-tuning", "peft.target_modules": DELETE}

# (id, overrides of the base spec, the problem's start, a part of its message)
REJECTIONS = [
    ("unknown-top-key", {"nme": "x"}, "nme: unknown key", "known keys are: name, model, data"),
    ("unknown-nested-key", {"search.trails": 3}, "search.trails: unknown key", "did you mean 'trials'"),
    ("unknown-deep-key", {"resources.deepspeed.stage": 3}, "resources.deepspeed.stage: unknown key", "zero_stage"),
    ("unknown-space-key", {"space.rank": [1, 2]}, "space.rank: unknown key", "known keys are: r, lora_alpha"),
    ("unknown-method", {"peft.method": "lorax"}, "peft.method: unknown PEFT method 'lorax'", "lora, prompt-tuning"),
    ("rank-below-1", {"space.r": [0, 1, 2]}, "space.r: rank must be >= 1, got 0", ""),
    ("rank-range-below-1", {"space.r": {"low": 0, "high": 8}}, "space.r.low: rank must be >= 1, got 0", ""),
    ("rank-empty-list", {"space.r": []}, "space.r: an empty list", ""),
    ("rank-above-layer", {"space.r": [8, 128]}, "space.r: rank must be <= 64", "(query, value), got 128"),
    ("fixed-rank-above-layer", {"space.r": DELETE, "peft.r": 128}, "peft.r: rank must be <= 64", "got 128"),
    ("lora-alpha-zero", {"space.alpha_ratio": DELETE, "peft.lora_alpha": 0}, "peft.lora_alpha: lora_alpha must be > 0", ""),
    ("alpha-ratio-zero", {"space.alpha_ratio": [0, 1]}, "space.alpha_ratio: alpha_ratio must be > 0", ""),
    ("alpha-both", {"peft.lora_alpha": 16}, "space.alpha_ratio: give lora_alpha or alpha_ratio, not both", ""),
    ("dropout-one", {"space.lora_dropout": {"low": 0.0, "high": 1.0}}, "space.lora_dropout.high: dropout must be < 1", ""),
    ("dropout-negative", {"peft.lora_dropout": -0.1}, "peft.lora_dropout: dropout must be >= 0, got -0.1", ""),
    ("lr-zero", {"space.learning_rate": DELETE, "training.learning_rate": 0}, "training.learning_rate: learning rate must be > 0", ""),
    ("lr-negative-choice", {"space.learning_rate": [1e-4, -1e-4]}, "space.learning_rate: learning rate must be > 0", ""),
    ("log-low-zero", {"space.learning_rate": {"low": 0, "high": 1e-3, "log": True}}, "space.learning_rate.low: a log range needs low > 0", ""),
    ("low-above-high", {"space.learning_rate": {"low": 1e-3, "high": 1e-5}}, "space.learning_rate: `low < high` must hold", ""),
    ("virtual-tokens-zero", {**PROMPT, "space": {"num_virtual_tokens": [0, 5]}}, "space.num_virtual_tokens: num_virtual_tokens must be >= 1", ""),
    ("param-of-other-method", PROMPT, "space.r: unknown key", "r is a parameter of lora, not of prompt-tuning"),
    ("no-label-field", {"data.label_field": DELETE}, "data.label_field: sequence-classification needs", ""),
    ("missing-data-file", {"data.train": "/nonexistent/train.jsonl"}, "data.train: /nonexistent/train.jsonl: no such file", ""),
    ("no-text-field", {"data.text_field": "sentence"}, "data.text_field: 'sentence' is missing", "the rows have: label, text"),
    ("no-label-in-rows", {"data.label_field": "category"}, "data.label_field: 'category' is missing", ""),
    ("trials-zero", {"search.trials": 0}, "search.trials: must be >= 1, got 0", ""),
    ("concurrency-zero", {"search.concurrency": 0}, "search.concurrency: must be >= 1, got 0", ""),
    ("storage-scheme", {"storage": "mysql://u:pw@h/db"}, "storage: unknown scheme 'mysql'", "mysql://u:***@h/db"),
    ("unknown-task", {"model.task": "question-answering"}, "model.task: must be one of", "got 'question-answering'"),
    ("unknown-quantization", {"model.quantization": "fp8"}, "model.quantization: must be one of none, nf4, int8", ""),
    ("unknown-algorithm", {"search.algorithm": "cmaes"},
     "search.algorithm: must be one of gp, tpe, random, grid, nsga2", ""),
    ("unknown-scheduler", {"search.scheduler": "pbt"}, "search.scheduler: must be one of asha, none", ""),
    ("unknown-tracking", {"tracking.wandb": "maybe"}, "tracking.wandb: must be one of offline, online, disabled", ""),
    ("bad-name", {"name": "my run/1"}, "name: must match [A-Za-z0-9._-]+", "'my run/1'"),
    ("missing-name", {"name": DELETE}, "name: required key is missing", ""),
    ("missing-module", {"peft.target_modules": ["q_proj"]}, "peft.target_modules: the model has no linear layer named 'q_proj'",
     "its linear layers are: classifier, dense, key, query, value"),
    ("string-for-int", {"training.epochs": "three"}, "training.epochs: epochs must be an integer, got 'three' (str)", ""),
    ("string-for-float", {"space.learning_rate": {"low": "fast", "high": 1e-3}}, "space.learning_rate.low: must be a number", "'fast'"),
    ("string-for-section", {"search": "fast"}, "search: must be a mapping", ""),
    ("searched-and-fixed", {"training.learning_rate": 1e-4}, "space.learning_rate: also fixed in training.learning_rate", ""),
    ("nothing-searched", {"space": {}}, "space: nothing is searched", ""),
    ("grid-continuous", {"search.algorithm": "grid"}, "space.learning_rate: grid search needs a finite set", ""),
    ("asha-two-objectives", {"objective.metric": ["eval_accuracy", "peak_mem_mb"], "objective.mode": ["max", "min"]},
     "search.scheduler: asha stops trials on one metric", ""),
    ("modes-per-metric", {"objective.metric": ["eval_accuracy", "peak_mem_mb"], "objective.mode": "max",
                          "search.scheduler": "none"}, "objective.mode: needs one mode per metric", ""),
    ("metric-of-other-task", {"objective.metric": "eval_perplexity"}, "objective.metric: sequence-classification reports", ""),
    ("unknown-mode", {"objective.mode": "maximize"}, "objective.mode: must be one of min, max", ""),
    ("labels-for-causal-lm", {"model.task": "causal-lm"}, "data.label_field: causal-lm", "takes no labels"),
    ("prompt-text-missing", {**PROMPT, "space": {"prompt_init": ["random", "text"]}}, "space.prompt_init: prompt_init 'text' needs", ""),
    ("virtual-tokens-past-positions", {"peft.method": "prefix-tuning", "peft.target_modules": DELETE,
                                       "space": {"num_virtual_tokens": [10, 300]}},
     "space.num_virtual_tokens: num_virtual_tokens + max_length must be <= 256", ""),
    ("pack-with-offload", {"search.pack": 2, "resources.deepspeed": {"zero_stage": 2, "offload_optimizer": "cpu"}},
     "search.pack: 2 trials train together with the plain engine", "got offload_optimizer=cpu"),
    ("prefix-with-checkpointing", {"peft.method": "prefix-tuning", "peft.target_modules": DELETE,
                                   "model.gradient_checkpointing": True, "space": {"num_virtual_tokens": [2, 4]}},
     "model.gradient_checkpointing: prefix tuning cannot train with it", "leave it unset or false, got true"),
    ("max-length-past-positions", {"data.max_length": 1024}, "data.max_length: must be <= 256", ""),
    ("grace-past-rounds", {"search.grace_rounds": 5}, "search.grace_rounds: must be <= the eval rounds", ""),
    ("unsearchable", {"space.max_steps": [1, 2]}, "space.max_steps: cannot be searched", ""),
    ("range-for-bool", {"space.use_dora": {"low": 0, "high": 1}}, "space.use_dora: use_dora takes a list of choices", ""),
    ("param-in-wrong-section", {"training.r": 4}, "training.r: unknown key", "r belongs in peft:"),
    ("param-at-top-level", {"learning_rate": 1e-4}, "learning_rate: unknown key", "belongs in training:"),
    ("not-a-power-of-two", {"space.r": {"power_of_two": [3, 64]}}, "space.r.low: must be a power of two", ""),
    ("zero-stage", {"resources.deepspeed.zero_stage": 5}, "resources.deepspeed.zero_stage: must be <= 3", ""),
    ("offload-param-below-stage-3", {"resources.deepspeed": {"zero_stage": 2, "offload_param": "cpu"}},
     "resources.deepspeed.offload_param: parameter offload needs zero_stage 3", "got zero_stage=2"),
    ("offload-optimizer-stage-0", {"resources.deepspeed": {"zero_stage": 0, "offload_optimizer": "cpu"}},
     "resources.deepspeed.offload_optimizer: optimizer offload needs zero_stage >= 1", ""),
    ("offload-without-deepspeed", {"resources.deepspeed": {"enabled": False, "offload_optimizer": "cpu"}},
     "resources.deepspeed.enabled: offload_optimizer=cpu need(s) DeepSpeed", "got enabled=false"),
    ("unknown-offload-device", {"resources.deepspeed.offload_optimizer": "nvme"},
     "resources.deepspeed.offload_optimizer: must be one of none, cpu", "'nvme'"),
    ("int8-with-zero3", {"model.quantization": "int8", "resources.deepspeed": {"zero_stage": 3}},
     "model.quantization: int8 cannot run under ZeRO-3", "use nf4"),
    ("fractional-gpus-several-workers", {"resources.workers_per_trial": 2, "resources.gpus_per_worker": 0.5},
     "resources.gpus_per_worker: a fraction shares one GPU between workers", "got 0.5 with workers_per_trial=2"),
    ("gpus-fraction-above-one", {"resources.gpus_per_worker": 1.5}, "resources.gpus_per_worker: must be a whole number",
     "got 1.5"),
    ("paged-optimizer-without-gpus", {"training.optimizer": "paged_adamw_8bit"},
     "training.optimizer: paged_adamw_8bit pages its state through CUDA", "got gpus_per_worker=0"),
    ("unknown-optimizer", {"training.optimizer": "sgd"}, "training.optimizer: must be one of adamw, paged_adamw_8bit", ""),
    ("unknown-dtype", {"model.dtype": "fp8"}, "model.dtype: must be one of auto, float32, bfloat16, float16", ""),
    ("fp16-without-autocast", {"model.dtype": "float16", "model.autocast": False},
     "model.autocast: float16 trains under autocast", "got false"),
    ("ia3-feedforward-outside-targets", {"peft": {"method": "ia3", "target_modules": ["key", "value"],
                                                  "feedforward_modules": ["output.dense"]},
                                         "space": {"learning_rate": [1e-3, 1e-2]}},
     "peft.feedforward_modules: feed-forward modules must also be target modules", ""),
    ("local-model-missing", {"model.name_or_path": "./no/such/dir"}, "model.name_or_path: no such directory", ""),
    ("liger-without-gpu", {"model.liger_kernel": True}, "model.liger_kernel: Liger kernels run(s) on CUDA GPUs only", ""),
    ("flash-attention-without-gpu", {"model.attn_implementation": "flash_attention_2"},
     "model.attn_implementation: flash_attention_2 run(s) on CUDA GPUs only", ""),
    ("unknown-attention", {"model.attn_implementation": "flash"}, "model.attn_implementation: must be one of", "'flash'"),
    ("checkpointing-not-bool", {"model.gradient_checkpointing": "on"}, "model.gradient_checkpointing: must be true or false", ""),
    ("pack-unknown-word", {"search.pack": "max"}, "search.pack: must be an integer or auto", "got 'max' (str)"),
    ("pack-auto-not-lora", {**PROMPT, "space": {"num_virtual_tokens": [1, 5]}, "search.pack": "auto"},
     "search.pack: auto: packed trials train together only as LoRA adapters", "got peft.method=prompt-tuning"),
    ("pack-max-zero", {"search.pack": "auto", "search.pack_max": 0}, "search.pack_max: must be >= 1, got 0", ""),
    ("pack-min-gain-above-one", {"search.pack": "auto", "search.pack_min_gain": 1.5},
     "search.pack_min_gain: must be <= 1, got 1.5", ""),
    ("memory-budget-zero", {"search.pack": "auto", "resources.memory_budget_gb": 0},
     "resources.memory_budget_gb: must be > 0, got 0", ""),
    ("memory-budget-without-auto", {"search.pack": 2, "resources.memory_budget_gb": 8},
     "resources.memory_budget_gb: only search.pack: auto plans with a memory budget", "got pack=2"),
]


@pytest.mark.parametrize("overrides, start, part", [case[1:] for case in REJECTIONS], ids=[case[0] for case in REJECTIONS])
def test_rejection_names_the_key_path(tiny_world, tmp_path, overrides, start, part):
    path = write_spec(tmp_path, merged(base_spec(tiny_world), overrides))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    problems = caught.value.problems
    matching = [problem for problem in problems if problem.startswith(start)]
    assert matching, problems
    assert part in matching[0]
    assert all("\n" not in problem for problem in problems)


def test_base_spec_is_valid(tiny_world, tmp_path):
    spec = load_spec(write_spec(tmp_path, base_spec(tiny_world)))
    assert spec.peft.method == "lora" and spec.model_shape.model_type == "bert"


def test_pack_auto_is_valid_and_round_trips(tiny_world, tmp_path):
    from search.spec.rules import spec_to_dict

    spec = load_spec(write_spec(tmp_path, merged(base_spec(tiny_world), {
        "search.pack": "auto", "search.pack_max": 4, "resources.memory_budget_gb": 2.5})))
    assert (spec.search.pack, spec.search.pack_max, spec.resources.memory_budget_gb) == ("auto", 4, 2.5)
    assert spec_to_dict(spec)["search"]["pack"] == "auto"


def test_empty_data_file(tiny_world, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path = write_spec(tmp_path, merged(base_spec(tiny_world), {"data.train": str(empty)}))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert any(problem.startswith("data.train: has no rows") for problem in caught.value.problems)


def test_model_directory_without_config(tiny_world, tmp_path):
    (tmp_path / "not_a_model").mkdir()
    path = write_spec(tmp_path, merged(base_spec(tiny_world), {"model.name_or_path": str(tmp_path / "not_a_model")}))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert any(problem.startswith("model.name_or_path:") and "has no config.json" in problem
               for problem in caught.value.problems)


def test_hub_id_not_cached_offline(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache
    path = write_spec(tmp_path, merged(base_spec(tiny_world), {"model.name_or_path": "nobody/no-such-model"}))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert any(problem.startswith("model.name_or_path: 'nobody/no-such-model'") and "HF_HUB_OFFLINE" in problem
               for problem in caught.value.problems)


def test_malformed_yaml(tmp_path):
    path = write_spec(tmp_path, None, text="name: x\nmodel: {name_or_path: [unclosed\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    (problem,) = caught.value.problems
    assert "not valid YAML at line" in problem


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="spec: must be a mapping of sections"):
        load_spec(write_spec(tmp_path, None, text="- a\n- b\n"))


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(str(tmp_path / "nope.yaml"))


def test_all_problems_are_reported_at_once(tiny_world, tmp_path):
    spec = merged(base_spec(tiny_world), {"search.trials": 0, "space.r": [0, 4], "data.train": "/nonexistent.jsonl"})
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, spec))
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert [problem.split(":")[0] for problem in problems] == ["search.trials", "data.train", "space.r"] or \
        sorted(problem.split(":")[0] for problem in problems) == ["data.train", "search.trials", "space.r"]
    assert str(caught.value).count("\n") == 2


def test_relative_paths_are_read_from_the_spec_directory(tiny_world, tmp_path):
    (tmp_path / "data").mkdir()
    with open(tiny_world["train"]) as source, open(tmp_path / "data" / "train.jsonl", "w") as target:
        target.write(source.read())
    spec = load_spec(write_spec(tmp_path, merged(base_spec(tiny_world), {"data.train": "data/train.jsonl"})))
    assert spec.data.train == os.path.join(str(tmp_path), "data", "train.jsonl")


def test_checks_can_be_skipped(tiny_world, tmp_path):
    spec = merged(base_spec(tiny_world), {"data.train": "/nonexistent.jsonl", "model.name_or_path": "./missing"})
    loaded = load_spec(write_spec(tmp_path, spec), check_files=False, check_model=False)
    assert loaded.model_shape is None


def test_speed_options_reach_the_trial_settings(tiny_world, tmp_path):
    spec = load_spec(write_spec(tmp_path, merged(base_spec(tiny_world), {
        "model.autocast": True, "model.gradient_checkpointing": False, "model.attn_implementation": "sdpa"})))
    model = spec.trial_settings({}).model
    assert (model.autocast, model.gradient_checkpointing, model.attn_implementation) == (True, False, "sdpa")
    assert (model.liger_kernel, model.compile) == (False, False)
