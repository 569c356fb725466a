"""Rules across a spec's sections, and what a validated spec turns into (TrialSettings, a dict).

`parse_sections` parses the sections of raw YAML (collecting every problem), `cross_problems`
checks rules between sections, `file_and_model_problems` looks at the data and the model.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

from search.spec.params import conflict_problems, pair_problems, parse_peft, parse_space
from search.spec.sections import (DEFAULT_METRIC, GENERATION_MODES, SYSTEM_METRICS, SYSTEM_MODES, TASK_METRICS,
                                  DataSection, GenerationSection, ModelSection, ObjectiveSection, ResourcesSection,
                                  SearchSection, TrackingSection, TrainingSection, name_problems, storage_problems)
from search.spec.token_checks import token_key_problems
from spaces.kinds import RatioTo
from spaces.methods import get_method

_HINTS = {  # keys users put in the wrong section
    "max_length": " (max_length belongs in data:, or in space: to search it)",
    "method": " (method belongs in peft:)",
    "target_modules": " (target_modules belongs in peft:)",
}


def _training_hints() -> Dict[str, str]:
    hints = dict(_HINTS)
    for name in ("r", "lora_alpha", "alpha_ratio", "lora_dropout", "num_virtual_tokens", "use_rslora", "use_dora"):
        hints[name] = f" ({name} belongs in peft:, or in space: to search it)"
    return hints


def complete_objective(objective: ObjectiveSection, task: str) -> Tuple[ObjectiveSection, List[str]]:
    """Fill the task's default metric and the usual mode of known metrics; check metrics fit the task."""
    from search.spec.token_checks import is_per_type_f1

    metrics = objective.metrics or (DEFAULT_METRIC[task],)
    generated = GENERATION_MODES if task == "causal-lm" else {}
    known = {**TASK_METRICS[task], **generated, **SYSTEM_MODES,
             **{name: "max" for name in metrics if is_per_type_f1(task, name)}}
    problems = []
    for name in metrics:
        if name not in known:
            per_type = ", eval_f1_<TYPE>" if task == "token-classification" else ""
            per_type += f", {', '.join(generated)} (generation)" if generated else ""
            problems.append(f"objective.metric: {task} reports {', '.join(TASK_METRICS[task])}{per_type} "
                            f"(and {', '.join(SYSTEM_METRICS)}), got {name!r}")
    if problems:
        return objective, problems
    modes = objective.modes or tuple(known[name] for name in metrics)
    single = len(metrics) == 1
    # entity-level F1 over BIO tags is what the guide's NER bar is about (search/spec/guidance.py)
    task_kind = objective.task_kind or ("ner" if task == "token-classification" else None)
    return replace(objective, metric=metrics[0] if single else metrics, mode=modes[0] if single else modes,
                   task_kind=task_kind), []


def parse_sections(raw: Mapping[str, Any], problems: List[str]) -> Dict[str, Any]:
    """The parsed parts of a spec (None for a part with problems); every problem added to `problems`."""
    parts: Dict[str, Any] = {}
    if "name" not in raw:
        problems.append("name: required key is missing (the run directory's name, [A-Za-z0-9._-]+)")
    else:
        bad_name = name_problems(raw["name"])
        problems += bad_name
        if not bad_name:
            parts["name"] = raw["name"]
    for key in ("model", "data"):
        if key not in raw:
            problems.append(f"{key}: required section is missing")
    parts["model"] = ModelSection.parse(raw.get("model"), problems) if "model" in raw else None
    parts["data"] = DataSection.parse(raw.get("data"), problems) if "data" in raw else None
    parts["training"] = TrainingSection.parse(raw.get("training"), problems, hints=_training_hints())
    parts["objective"] = ObjectiveSection.parse(raw.get("objective"), problems)
    parts["search"] = SearchSection.parse(raw.get("search"), problems)
    parts["generation"] = GenerationSection.parse(raw.get("generation"), problems)
    parts["resources"] = ResourcesSection.parse(raw.get("resources"), problems)
    parts["tracking"] = TrackingSection.parse(raw.get("tracking"), problems)
    storage = raw.get("storage", "sqlite")
    storage_issues = storage_problems(storage, check_environment=False)
    problems += storage_issues
    parts["storage"] = None if storage_issues else storage
    parts["peft"] = parse_peft(raw.get("peft"), problems)
    peft_raw = raw.get("peft") if isinstance(raw.get("peft"), dict) else {}
    method = peft_raw.get("method", "lora")
    known_method = isinstance(method, str) and _is_method(method)
    parts["space"] = parse_space(raw.get("space"), method if known_method else None, problems)
    if parts["space"] is not None:
        conflicts = conflict_problems(raw, parts["space"], method if known_method else None)
        problems += conflicts
        if conflicts:
            parts["space"] = None
    problems += cross_problems(parts)
    return parts


def _is_method(name: str) -> bool:
    try:
        get_method(name)
        return True
    except KeyError:
        return False


def cross_problems(parts: Dict[str, Any]) -> List[str]:
    """Rules between sections; each runs only when the sections it reads are valid. Completes the
    objective (default metric and modes) in `parts`."""
    problems: List[str] = []
    model, data, peft, space = parts.get("model"), parts.get("data"), parts.get("peft"), parts.get("space")
    training, objective, search, resources = (parts.get(key) for key in ("training", "objective", "search", "resources"))
    if model and data:
        if model.task == "sequence-classification" and not data.label_field:
            problems.append("data.label_field: sequence-classification needs the name of the label field "
                            "(e.g. label_field: label), got none")
        if model.task == "causal-lm" and data.label_field:
            problems.append(f"data.label_field: causal-lm learns the text itself and takes no labels, "
                            f"got {data.label_field!r}")
    problems += token_key_problems(model, data, peft)
    if model and resources and not resources.gpus_per_worker:
        gpu_only = {"liger_kernel": "Liger kernels" if model.liger_kernel else None,
                    "attn_implementation": model.attn_implementation
                    if (model.attn_implementation or "").startswith("flash_") else None}
        for option, what in gpu_only.items():
            if what:
                problems.append(f"model.{option}: {what} run(s) on CUDA GPUs only; set resources.gpus_per_worker "
                                f"(got 0) or turn {option} off")
    problems += _engine_problems(model, training, resources)
    if model and objective:
        objective, more = complete_objective(objective, model.task)
        problems += more
        parts["objective"] = objective if not more else None
    generation = parts.get("generation")
    generated = [name for name in (objective.metrics if objective else ()) if name in GENERATION_MODES]
    if generated and generation and not generation.rows:
        problems.append(f"objective.metric: {', '.join(generated)} scores generated answers; set generation.rows "
                        f"(eval rows answered each round) above 0, got 0")
    if peft and space is not None:
        fixed = dict(peft.params)
        for name, param in get_method(peft.method).params.items():
            fixed.setdefault(name, param.default)
        problems += pair_problems(get_method(peft.method), peft.params, space, fixed)
        if not any(kind.searched for kind in space.values()):
            problems.append("space: nothing is searched; add at least one parameter with several values "
                            "(e.g. r: [4, 8, 16] or learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true})")
    if search and space is not None and search.algorithm == "grid":
        for key, kind in space.items():
            if kind.searched and kind.grid() is None:
                problems.append(f"space.{key}: grid search needs a finite set (a list, or a range with step), "
                                f"got {kind.to_yaml()}")
    if search and parts.get("objective") and len(parts["objective"].metrics) > 1 and search.scheduler == "asha":
        problems.append(f"search.scheduler: asha stops trials on one metric; with "
                        f"{len(parts['objective'].metrics)} objectives use scheduler: none, got asha")
    if search and parts.get("objective") and len(parts["objective"].metrics) > 1 and search.refine_every:
        problems.append(f"search.refine_every: refinement rates settings on one objective; with "
                        f"{len(parts['objective'].metrics)} objectives set refine_every: 0, got {search.refine_every}")
    if search and (search.pack == "auto" or search.pack > 1):
        problems += _pack_problems(search, peft, space, model, resources)
    if peft and model and peft.method == "prefix-tuning" and model.gradient_checkpointing:
        problems.append("model.gradient_checkpointing: prefix tuning cannot train with it (PEFT refuses: the "
                        "prefix's key/value states would be recomputed without their gradients); leave it unset "
                        "or false, got true")
    if search and resources and resources.memory_budget_gb is not None and search.pack != "auto":
        problems.append(f"resources.memory_budget_gb: only search.pack: auto plans with a memory budget; "
                        f"remove it or set pack: auto, got pack={search.pack}")
    if search and training and space is not None:
        epochs = training.epochs
        if "epochs" in space:
            epochs = max(value for _subpath, value in space["epochs"].extremes())
        rounds = epochs * search.evals_per_epoch
        if search.grace_rounds > rounds:
            problems.append(f"search.grace_rounds: must be <= the eval rounds of a trial "
                            f"(epochs * evals_per_epoch = {rounds}), got {search.grace_rounds}")
    return problems


def _pack_problems(search, peft, space, model, resources) -> List[str]:
    """What packed trials need (trainers/packed.why_not_packable says the same of one trial's settings)."""
    problems = []
    where = "search.pack: auto: packed trials train together" if search.pack == "auto" else \
        f"search.pack: {search.pack} trials train together"
    if peft and peft.method != "lora":
        problems.append(f"{where} only as LoRA adapters (they share one forward pass); got peft.method={peft.method}")
    if resources and resources.workers_per_trial != 1:
        problems.append(f"{where} in one worker; got resources.workers_per_trial={resources.workers_per_trial}")
    if model and model.compile:
        problems.append(f"{where} on an uncompiled model (each change of members would recompile); "
                        "set model.compile: false")
    if peft and (peft.params.get("use_dora") or (space is not None and "use_dora" in space)):
        problems.append(f"{where}: not with use_dora (it renormalises each trial's whole weight)")
    deepspeed = resources.deepspeed if resources else None
    offloaded = [f"{key}={getattr(deepspeed, key)}" for key in ("offload_optimizer", "offload_param")
                 if deepspeed and deepspeed.enabled and getattr(deepspeed, key) != "none"]
    if offloaded:
        problems.append(f"{where} with the plain engine (one optimizer per trial, no DeepSpeed), so nothing would "
                        f"be offloaded; remove the offload or the packing, got {', '.join(offloaded)}")
    return problems


def _engine_problems(model, training, resources) -> List[str]:
    """Known-bad combinations of quantization, optimizer and DeepSpeed, each with its reason."""
    problems: List[str] = []
    if not resources:
        return problems
    zero3 = resources.deepspeed.enabled and resources.deepspeed.zero_stage == 3
    if model and model.quantization == "int8" and zero3:
        problems.append("model.quantization: int8 cannot run under ZeRO-3 (bitsandbytes stores 8-bit weights as "
                        "int8 with their scales beside them, which ZeRO-3 cannot partition); use nf4, or "
                        "resources.deepspeed.zero_stage <= 2, got int8 with zero_stage=3")
    if model and model.dtype == "float16" and model.autocast is False:
        problems.append("model.autocast: float16 trains under autocast (fp32 trained weights, fp16 compute, loss "
                        "scaling); leave it unset or true, got false")
    if training and training.optimizer == "paged_adamw_8bit" and not resources.gpus_per_worker:
        problems.append("training.optimizer: paged_adamw_8bit pages its state through CUDA unified memory and "
                        "needs GPUs; set resources.gpus_per_worker or use adamw, got gpus_per_worker=0")
    return problems


def spec_problems(spec) -> List[str]:
    """Cross-section problems of a constructed SearchSpec (the objective gets its defaults here)."""
    problems = []
    problems += name_problems(spec.name)
    problems += storage_problems(spec.storage, check_environment=False)
    parts = {f.name: getattr(spec, f.name) for f in fields(spec)}
    problems += cross_problems(parts)
    if not problems:
        object.__setattr__(spec, "objective", parts["objective"])
    return problems


def file_and_model_problems(parts: Mapping[str, Any], check_files: bool, check_model: bool):
    """(ModelShape or None, problems) of the data files, the storage and the model."""
    from search.spec.checks import data_problems, deepspeed_config_problems, inspect_reference, shape_problems
    from search.spec.params import fixed_values

    problems: List[str] = []
    if check_files and parts.get("data") and parts.get("model"):
        problems += data_problems(parts["data"], parts["model"].task)
    if check_files and parts.get("storage"):
        problems += storage_problems(parts["storage"], check_environment=True)
    if check_files and parts.get("resources") and parts["resources"].storage_path:
        from search.store.remote import reach_problem

        problems += [problem for problem in [reach_problem(parts["resources"].storage_path)] if problem]
    if check_files and all(parts.get(key) is not None for key in ("model", "training", "resources", "space")):
        problems += deepspeed_config_problems(parts["model"], parts["training"], parts["resources"], parts["space"])
    shape = None
    if check_model and parts.get("model"):
        shape, more = inspect_reference(parts["model"].name_or_path, parts["model"].task)
        problems += more
        if shape is not None and all(parts.get(key) is not None for key in ("peft", "space", "training", "data")):
            training = {f.name: getattr(parts["training"], f.name) for f in fields(parts["training"])}
            fixed = fixed_values(parts["peft"], training, parts["data"].max_length)
            where = "space.max_length" if "max_length" in parts["space"] else "data.max_length"
            problems += shape_problems(shape, parts["peft"].method, fixed, parts["space"], where)
    return shape, problems


def _model_type(spec) -> Optional[str]:
    if spec.model_shape is not None:
        return spec.model_shape.model_type
    try:  # a cheap config read; None when the model is not reachable now (the trainer resolves "auto")
        from trainers.inspect import load_config
        return load_config(spec.model.name_or_path)[1].model_type
    except Exception:
        return None


def resolved_peft_params(spec, values: Mapping[str, Any]) -> Dict[str, Any]:
    """The method's PEFT arguments of one trial, with target modules "auto" resolved where possible."""
    from search.spec.checks import resolve_modules
    from spaces.targets import UnknownArchitecture

    method = get_method(spec.peft.method)
    params = {name: values[name] for name in method.params if name in values}
    for name, value in params.items():
        if isinstance(value, tuple):
            params[name] = list(value)
    if method.has_target_modules and "auto" in (params.get("target_modules"), params.get("feedforward_modules")):
        model_type = _model_type(spec)
        if model_type is not None:
            try:
                targets = resolve_modules(params["target_modules"], model_type, method.name)
                params["target_modules"] = targets
                if method.name == "ia3" and params.get("feedforward_modules") == "auto":
                    preset = resolve_modules("auto", model_type, "ia3", feedforward=True)
                    params["feedforward_modules"] = [name for name in preset if name in targets]
            except UnknownArchitecture:
                pass  # left "auto": the trainer's spaces.targets.default_target_modules says why
    return params


def plateau_monitor(objective: ObjectiveSection) -> Tuple[str, str]:
    """(metric, mode) that plateau stopping watches: the objective's first eval_* metric, else eval_loss
    (a system figure such as tokens_per_s says nothing about whether training still improves)."""
    for name, mode in zip(objective.metrics, objective.modes):
        if name.startswith("eval_"):
            return name, mode
    return "eval_loss", "min"


def build_trial_settings(spec, values: Mapping[str, Any]):
    from trainers.settings import GenerationSettings, ModelSettings, PeftSettings, TrainingSettings, TrialSettings

    training_names = [f.name for f in fields(TrainingSettings)]
    training = {name: values[name] for name in training_names if name in values}
    training["monitor"], training["monitor_mode"] = plateau_monitor(spec.objective)
    model = ModelSettings(**{f.name: getattr(spec.model, f.name) for f in fields(ModelSettings)})
    if spec.peft.method == "prefix-tuning" and model.gradient_checkpointing is None:
        # unset means on for a quantized base, which prefix tuning cannot train with
        model = replace(model, gradient_checkpointing=False)
    generation = spec.generation
    return TrialSettings(
        model=model,
        data=data_settings(spec, int(values["max_length"])),
        peft=PeftSettings(spec.peft.method, resolved_peft_params(spec, values)),
        training=TrainingSettings(**training, evals_per_epoch=spec.search.evals_per_epoch, seed=spec.search.seed),
        engine=engine_settings(spec.resources),
        # base_answers: the trial function asks the first trial for them (search/run/trial.py)
        generation=GenerationSettings(rows=generation.rows if spec.model.task == "causal-lm" else 0,
                                      max_new_tokens=generation.max_new_tokens, batch_size=generation.batch_size,
                                      seed=spec.search.seed, examples=generation.examples),
    )


def data_settings(spec, max_length: int):
    """DataSettings of a spec's trials; a data.chat_template file is read here, so workers need no copy of it."""
    from trainers.records import read_chat_template
    from trainers.settings import DataSettings

    data = spec.data
    return DataSettings(train=data.train, eval=data.eval, text_field=data.text_field, label_field=data.label_field,
                        max_length=max_length, eval_fraction=data.eval_fraction, split_seed=spec.search.seed,
                        format=data.format, prompt_field=data.prompt_field, completion_field=data.completion_field,
                        messages_field=data.messages_field, chat_template=read_chat_template(data.chat_template),
                        completion_only_loss=data.completion_only_loss, tokens_field=data.tokens_field,
                        tags_field=data.tags_field)


def engine_settings(resources):
    """EngineSettings from `resources:`; the user's DeepSpeed JSON is read here, so workers need no file."""
    from trainers.deepspeed_config import read_user_config
    from trainers.settings import EngineSettings

    deepspeed = resources.deepspeed
    user_config = read_user_config(deepspeed.config) if deepspeed.enabled and deepspeed.config else {}
    return EngineSettings(deepspeed=deepspeed.enabled, zero_stage=deepspeed.zero_stage,
                          offload_optimizer=deepspeed.offload_optimizer, offload_param=deepspeed.offload_param,
                          user_config=user_config, num_threads=max(1, int(resources.cpus_per_worker)),
                          host_memory_mb=(resources.memory_per_worker_gb * 1024
                                          if resources.memory_per_worker_gb is not None else None))


def _section_dict(section, skip=()) -> Dict[str, Any]:
    out = {}
    for f in fields(section):
        if f.name in skip or "type" not in f.metadata:
            continue
        value = getattr(section, f.name)
        if hasattr(value, "__dataclass_fields__"):
            value = _section_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def spec_to_dict(spec) -> Dict[str, Any]:
    method = get_method(spec.peft.method)
    peft: Dict[str, Any] = {"method": spec.peft.method}
    alpha_given = any(target in spec.peft.params or target in spec.space for target, _o in method.ratios.values())
    for name, param in method.params.items():
        if name in spec.space:
            continue
        if name in method.ratios and (alpha_given or any(name2 in spec.space for name2 in method.ratios)):
            continue
        value = spec.peft.params.get(name, param.default)
        if value is not None:
            peft[name] = list(value) if isinstance(value, tuple) else value
    objective = _section_dict(spec.objective)
    return {
        "name": spec.name,
        "model": _section_dict(spec.model),
        "data": _section_dict(spec.data, skip=("max_length",) if "max_length" in spec.space else ()),
        "peft": peft,
        # alpha_ratio: [1, 2] is written as given; RatioTo's own form is for `lora_alpha: {ratio_to: r, ...}`
        "space": {key: kind.ratio.to_yaml() if key in method.ratios and isinstance(kind, RatioTo) else kind.to_yaml()
                  for key, kind in spec.space.items()},
        "training": _section_dict(spec.training, skip=tuple(spec.space)),
        "objective": objective,
        "search": _section_dict(spec.search),
        "generation": _section_dict(spec.generation),
        "resources": _section_dict(spec.resources),
        "storage": spec.storage,
        "tracking": _section_dict(spec.tracking),
    }
