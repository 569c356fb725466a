"""The published PEFT guidance (its tables of data minimums, method viability and quality thresholds per task),
checked against the user's own setup: `validate` warns where the spec goes against it, and the report says
whether the best trial clears the quality bar for the task.

The task kind is what the user's task is judged as (`objective.task_kind`), not the model head: an instruction
dataset trained as causal-lm may be extractive QA or summarization. A user's own bar (`objective.threshold`)
takes the guide's place.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

TASK_KINDS = ("classification", "ner", "extractive-qa", "summarization", "code", "text-to-sql", "instruction")

# The fewest training rows the guide deems enough, per task kind and method family (LoRA and its variants,
# IA3, prompt-based: prompt and prefix tuning): the entries the guide states (classification: 500-1K rows for
# LoRA), no others guessed.
MIN_TRAIN_ROWS = {
    "classification": {"lora": 500},
}
# Prompt tuning: not recommended at all for these; not viable below ~1B parameters with few virtual tokens.
PROMPT_TUNING_NOT_RECOMMENDED = ("extractive-qa", "code", "text-to-sql")
PROMPT_TUNING_MIN_PARAMS = 1e9
PROMPT_TUNING_FEW_TOKENS = 50
# The quality a fine-tuned model should reach on the task: (metric suffix, bar), all of which must hold.
QUALITY_BARS = {
    "classification": (("f1", 0.85),),
    "extractive-qa": (("exact_match", 0.70), ("f1", 0.82)),
    "summarization": (("rougeL", 0.38),),
    "ner": (("f1", 0.80),),
}
PROMPT_METHODS = ("prompt-tuning", "prefix-tuning")


def family(method: str) -> str:
    return "prompt" if method in PROMPT_METHODS else "ia3" if method == "ia3" else "lora"


def setup_warnings(task_kind: Optional[str], method: str, train_rows: Optional[int], model_params: Optional[float],
                   num_virtual_tokens: Sequence[int] = ()) -> List[str]:
    """What the guide says against this setup, one warning each; `num_virtual_tokens`: every value searched."""
    warnings = []
    minimum = MIN_TRAIN_ROWS.get(task_kind or "", {}).get(family(method))
    if minimum and train_rows is not None and train_rows < minimum:
        warnings.append(f"data.train: {train_rows} rows; the PEFT guide deems {minimum} the fewest for {method} on "
                        f"{task_kind}: expect a noisy search and a weak best trial")
    if method == "prompt-tuning" and task_kind in PROMPT_TUNING_NOT_RECOMMENDED:
        warnings.append(f"peft.method: the PEFT guide does not recommend prompt tuning for {task_kind}; "
                        f"LoRA is its choice there")
    if method == "prompt-tuning" and model_params is not None and model_params < PROMPT_TUNING_MIN_PARAMS \
            and num_virtual_tokens and max(num_virtual_tokens) < PROMPT_TUNING_FEW_TOKENS:
        warnings.append(f"peft.method: prompt tuning with at most {max(num_virtual_tokens)} virtual tokens on a "
                        f"{model_params / 1e6:.0f}M-parameter model is rated not viable by the PEFT guide (it needs "
                        f"about 1B parameters, or more tokens); LoRA or IA3 train such a model far better")
    return warnings


def quality_verdict(task_kind: Optional[str], best: Mapping[str, object], threshold: Optional[float] = None,
                    metric: Optional[str] = None) -> Optional[str]:
    """Whether the best trial's metrics clear the bar: the user's `threshold` on `metric`, else the guide's
    for `task_kind`; None where there is no bar or the metrics needed are missing."""
    bars: Tuple[Tuple[str, float], ...]
    if threshold is not None and metric:
        bars, source = ((metric, threshold),), "your objective.threshold"
    elif task_kind in QUALITY_BARS:
        bars, source = QUALITY_BARS[task_kind], f"the PEFT guide's bar for {task_kind}"
    else:
        return None
    parts, cleared = [], True
    for suffix, bar in bars:
        name = suffix if suffix in best else f"eval_{suffix}"
        value = best.get(name)
        if not isinstance(value, (int, float)):
            return None
        cleared &= value > bar
        parts.append(f"`{name}` {value:.3g} {'>' if value > bar else '<='} {bar:g}")
    return (f"{'Clears' if cleared else 'Does not clear'} {source}: " + ", ".join(parts) + ".")


def guidance_findings(spec, shape) -> List[str]:
    """`setup_warnings` for a valid spec: its training rows (a local file's), the model's size (from `shape`,
    trainers.inspect.ModelShape or None) and the virtual tokens a prompt-tuning trial may get."""
    from spaces.kinds import RatioTo

    kind = spec.objective.task_kind
    if kind is None:
        return []
    tokens = spec.space.get("num_virtual_tokens")
    if tokens is not None and not isinstance(tokens, RatioTo):
        virtual = [value for _subpath, value in tokens.extremes()]
    else:
        virtual = [spec.peft.params.get("num_virtual_tokens", 20)] if spec.peft.method == "prompt-tuning" else []
    return setup_warnings(kind, spec.peft.method, _rows(spec.data.train), approximate_params(shape), virtual)


def approximate_params(shape) -> Optional[float]:
    """A model's parameters, from its linear layers and embeddings (what dominates a transformer's count)."""
    if shape is None or not shape.layers:
        return None
    embeddings = (shape.vocab_size or 0) * (shape.hidden_size or 0)
    return float(sum(fan_in * fan_out for fan_in, fan_out in shape.layers.values()) + embeddings)


def _rows(path: str) -> Optional[int]:
    """The rows of a local JSON lines or CSV file (None for other data: an HF dataset id)."""
    import os

    if not (isinstance(path, str) and os.path.isfile(path) and path.endswith((".jsonl", ".csv"))):
        return None
    with open(path, encoding="utf-8") as handle:
        count = sum(1 for line in handle if line.strip())
    return count - 1 if path.endswith(".csv") else count
