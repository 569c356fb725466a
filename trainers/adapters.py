"""PeftSettings -> a PEFT config, one small builder per method, registered by name.

Every method lists the parameters it knows with their defaults; an unknown parameter is an error
that names the known ones (a typo in a spec must not silently train with a default).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from trainers.data import CAUSAL_LM, CLASSIFICATION, TOKEN_CLASSIFICATION
from trainers.settings import PeftSettings

# PEFT's task types: SEQ_CLS and TOKEN_CLS also make the classification head trainable (modules_to_save).
TASK_TYPES = {CLASSIFICATION: "SEQ_CLS", CAUSAL_LM: "CAUSAL_LM", TOKEN_CLASSIFICATION: "TOKEN_CLS"}

# method -> known parameters and their defaults (published practice: r 8, alpha 2r, dropout 0.05)
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "lora": {"r": 8, "lora_alpha": None, "alpha_ratio": None, "lora_dropout": 0.05,
             "target_modules": "auto", "use_rslora": False, "use_dora": False},
    "prompt-tuning": {"num_virtual_tokens": 20, "prompt_init": "random", "prompt_init_text": None},
    "prefix-tuning": {"num_virtual_tokens": 20},
    "ia3": {"target_modules": "auto", "feedforward_modules": "auto"},
}
PROMPT_INITS = {"random": "RANDOM", "sample-vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def method_task_problem(method: str, task: str) -> Optional[str]:
    """Why PEFT cannot train `method` for `task` on any model, or None (prefix tuning depends on the model too:
    `prefix_tuning_problem`)."""
    if method == "prompt-tuning" and task == TOKEN_CLASSIFICATION:
        import peft

        # PeftModelForTokenClassification prepends the virtual tokens to the inputs but not to the labels, so
        # the model's loss compares rows + virtual tokens logits with rows labels and fails at the first step.
        return (f"prompt-tuning cannot train token-classification with PEFT {peft.__version__}: PEFT prepends the "
                f"virtual tokens to the input but not to the per-token labels, so the loss fails on their "
                f"different lengths; use LoRA, IA3 or prefix-tuning")
    return None


def prefix_tuning_problem(model, task: str) -> Optional[str]:
    """Why PEFT cannot prefix-tune `model` for `task`, or None. For a sequence or token classifier PEFT hands the
    prefix to the model's (or its backbone's) forward as `past_key_values` and checks the signature first;
    transformers 5.24 renamed that argument `cache`, which PEFT 0.21 does not know. Causal LMs take it through
    **kwargs."""
    import inspect

    from transformers import PreTrainedModel

    if task not in (CLASSIFICATION, TOKEN_CLASSIFICATION):
        return None

    def takes_prefix(module) -> bool:
        return "past_key_values" in inspect.signature(module.forward).parameters

    backbone = next((child for child in model.children() if isinstance(child, PreTrainedModel)), None)
    if takes_prefix(model) or (backbone is not None and takes_prefix(backbone)):
        return None
    import peft
    import transformers

    return (f"prefix-tuning cannot train a {task} model with transformers {transformers.__version__} and PEFT "
            f"{peft.__version__}: PEFT passes the prefix as `past_key_values`, which this transformers' "
            f"{type(backbone or model).__name__} no longer takes (transformers < 5.24 does); use prompt-tuning, "
            f"LoRA or IA3, or install transformers<5.24")


def method_params(peft: PeftSettings) -> Dict[str, Any]:
    """The method's parameters with defaults filled in; unknown keys are an error naming the known ones."""
    if peft.method not in DEFAULTS:
        raise ValueError(f"peft.method must be one of {sorted(DEFAULTS)}, got {peft.method!r}")
    known = DEFAULTS[peft.method]
    unknown = sorted(set(peft.params) - set(known))
    if unknown:
        raise ValueError(f"peft.{unknown[0]}: not a parameter of {peft.method}; "
                         f"known: {', '.join(sorted(known))}")
    return {**known, **peft.params}


def _auto_targets(model, method: str) -> Optional[List[str]]:
    """The per-architecture preset from spaces.targets; None (PEFT's own table) if that module is absent."""
    try:
        from spaces.targets import default_target_modules
    except ModuleNotFoundError as exc:
        if exc.name not in ("spaces", "spaces.targets"):
            raise
        return None
    return list(default_target_modules(model, method))


def _auto_feedforward(model, targets: Optional[List[str]]) -> Optional[List[str]]:
    """The preset feed-forward modules that are among `targets` (IA3 needs a subset of its targets)."""
    if targets is None:
        return None
    try:
        from spaces.targets import default_feedforward_modules

        preset = default_feedforward_modules(model)
    except ImportError:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as table

        preset = table.get(model.config.model_type, [])
    return [name for name in preset if name in targets]


def _targets(value: Any, model, method: str) -> Optional[List[str]]:
    if value == "auto":
        return _auto_targets(model, method)
    if isinstance(value, str):
        return [value] if value != "all-linear" else value  # PEFT understands "all-linear" itself
    return list(value)


def _lora(params: Mapping[str, Any], model, task_type: str, tokenizer_path: str):
    from peft import LoraConfig

    r = int(params["r"])
    alpha = params["lora_alpha"]
    if alpha is not None and params["alpha_ratio"] is not None:
        raise ValueError("peft: give lora_alpha or alpha_ratio, not both")
    if alpha is None:
        # alpha = 2r by default (published practice); alpha_ratio is the searched form of it
        alpha = r * (params["alpha_ratio"] if params["alpha_ratio"] is not None else 2)
    return LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=float(params["lora_dropout"]),
                      target_modules=_targets(params["target_modules"], model, "lora"),
                      use_rslora=bool(params["use_rslora"]), use_dora=bool(params["use_dora"]))


def _prompt_tuning(params: Mapping[str, Any], model, task_type: str, tokenizer_path: str):
    from peft import PromptTuningConfig

    init = params["prompt_init"]
    if init not in PROMPT_INITS:
        raise ValueError(f"peft.prompt_init must be one of {list(PROMPT_INITS)}, got {init!r}")
    text_init = init == "text"
    if text_init and not params["prompt_init_text"]:
        raise ValueError("peft.prompt_init_text: needed when prompt_init is 'text'")
    # SAMPLE_VOCAB (PEFT >= 0.14) starts from embeddings of random vocabulary tokens: on the
    # embedding manifold, unlike RANDOM.
    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=int(params["num_virtual_tokens"]),
                              prompt_tuning_init=PROMPT_INITS[init],
                              prompt_tuning_init_text=params["prompt_init_text"] if text_init else None,
                              tokenizer_name_or_path=tokenizer_path if text_init else None)


def _prefix_tuning(params: Mapping[str, Any], model, task_type: str, tokenizer_path: str):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=int(params["num_virtual_tokens"]))


def _ia3(params: Mapping[str, Any], model, task_type: str, tokenizer_path: str):
    from peft import IA3Config

    targets = _targets(params["target_modules"], model, "ia3")
    feedforward = params["feedforward_modules"]
    if feedforward == "auto":
        feedforward = _auto_feedforward(model, targets)
    elif isinstance(feedforward, str):
        feedforward = [feedforward]
    if targets is not None and feedforward is None:
        feedforward = []  # explicit targets, nothing said about feed-forward: scale outputs only
    return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward)


# name -> builder(params, model, task_type, tokenizer_path) -> PeftConfig
BUILDERS: Dict[str, Callable[..., Any]] = {
    "lora": _lora,
    "prompt-tuning": _prompt_tuning,
    "prefix-tuning": _prefix_tuning,
    "ia3": _ia3,
}


def build_peft_config(peft: PeftSettings, model, task: str, tokenizer_path: Optional[str] = None):
    """The PEFT config of `peft` for `model` (a loaded transformers model) and `task`."""
    if task not in TASK_TYPES:
        raise ValueError(f"model.task must be one of {list(TASK_TYPES)}, got {task!r}")
    params = method_params(peft)
    problem = method_task_problem(peft.method, task)
    if problem is None and peft.method == "prefix-tuning":
        problem = prefix_tuning_problem(model, task)
    if problem:   # PEFT itself would fail only at the first forward, with a message that names no fix
        raise ValueError(f"peft.method: {problem}")
    return BUILDERS[peft.method](params, model, TASK_TYPES[task], tokenizer_path)
