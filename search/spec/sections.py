"""The fixed-shape sections of a spec: model, data, training, objective, search, resources, tracking,
and the storage URL. (peft and space depend on the method: see search/spec/params.py.)

Each section is a frozen dataclass checked at construction (search/spec/fields.py); keys not in
INTERFACE.md are marked `# added`, with the reason.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union
from urllib.parse import urlsplit

from search.spec.guidance import TASK_KINDS
from search.spec.fields import Section, rule, show
from search.store.storage import INSTALL_HINT, redact_url  # redact_url: spec.py imports it from here
from spaces.methods import TRAINING_PARAMS
from trainers.settings import (ATTN_IMPLEMENTATIONS, DATA_FORMATS, DTYPES, GENERATION_METRICS, OFFLOAD_DEVICES,
                               OPTIMIZERS, QUANTIZATIONS, TASKS)

NAME_PATTERN = r"[A-Za-z0-9._-]+"
# The run directory's name, and the default W&B project (which allows 128 characters); a filesystem 255 bytes.
NAME_MAX_LENGTH = 128
ALGORITHMS = ("gp", "tpe", "random", "grid", "nsga2")
SCHEDULERS = ("asha", "none")
WANDB_MODES = ("offline", "online", "disabled")
# Figures every trial reports besides its eval_* metrics (INTERFACE.md, trials.csv); any may be an objective.
SYSTEM_METRICS = ("tokens_per_s", "peak_mem_mb", "adapter_mb", "train_s", "energy_j")
# Metrics the trainer reports per task, and which way is better.
TASK_METRICS = {
    "sequence-classification": {"eval_loss": "min", "eval_accuracy": "max", "eval_f1": "max"},
    "causal-lm": {"eval_loss": "min", "eval_perplexity": "min", "eval_accuracy": "max"},
    # added (issue 21): entity-level scores (seqeval's definition) and eval_f1_<TYPE> per entity type
    "token-classification": {"eval_loss": "min", "eval_accuracy": "max", "eval_precision": "max",
                             "eval_recall": "max", "eval_f1": "max"},
}
# eval_* metrics of generation-based evaluation (causal-lm rows with a reference answer; GenerationSection)
GENERATION_MODES = dict.fromkeys(GENERATION_METRICS, "max")
SYSTEM_MODES = {"tokens_per_s": "max", "peak_mem_mb": "min", "adapter_mb": "min", "train_s": "min", "energy_j": "min"}
DEFAULT_METRIC = {"sequence-classification": "eval_accuracy", "causal-lm": "eval_loss",
                  "token-classification": "eval_f1"}


@dataclass(frozen=True)
class ModelSection(Section):
    PATH = "model"
    name_or_path: str = rule()
    task: str = rule("sequence-classification", choices=TASKS)
    quantization: str = rule("none", choices=QUANTIZATIONS)
    # auto = bf16 on GPUs that have it, fp16 on older GPUs (with loss scaling), fp32 on CPU; also the
    # DeepSpeed precision
    dtype: str = rule("auto", choices=DTYPES)
    # speed options (trainers/kernels.py, measured in benchmarks/gpu_throughput.py)
    attn_implementation: Optional[str] = rule(None, nullable=True, choices=ATTN_IMPLEMENTATIONS)
    liger_kernel: bool = rule(False, "bool")     # Liger Triton kernels; CUDA and liger-kernel needed
    autocast: Optional[bool] = rule(None, "bool", nullable=True)   # torch.autocast forward; null: on for nf4/int8
    gradient_checkpointing: Optional[bool] = rule(None, "bool", nullable=True)   # null: on for nf4/int8
    compile: bool = rule(False, "bool")          # torch.compile each transformer block


@dataclass(frozen=True)
class DataSection(Section):
    PATH = "data"
    train: str = rule()
    eval: Optional[str] = rule(None, nullable=True)
    text_field: str = rule("text")
    label_field: Optional[str] = rule(None, nullable=True)    # required for sequence-classification
    max_length: int = rule(TRAINING_PARAMS["max_length"].default, param=TRAINING_PARAMS["max_length"])
    # share of train held out for eval when `eval` is not given (a seeded, fixed split)
    eval_fraction: float = rule(0.2, "float", low=0, low_open=True, high=1, high_open=True)
    # added (issue 21): causal-lm rows in TRL's formats. text | prompt-completion | messages; null: the format
    # whose fields train's first row holds (messages, then prompt + completion, then text)
    format: Optional[str] = rule(None, nullable=True, choices=DATA_FORMATS)
    prompt_field: str = rule("prompt")            # a string, or a list of {role, content} messages
    completion_field: str = rule("completion")    # the same type as the prompt
    messages_field: str = rule("messages")        # a conversation: a list of {role, content} messages
    # a Jinja chat template, or the path of a file holding one, for chat rows (messages, or prompt and completion
    # as message lists); null: the tokenizer's own
    chat_template: Optional[str] = rule(None, nullable=True)
    # the loss covers the completion / the assistant turns only; false: every token of the row
    completion_only_loss: bool = rule(True, "bool")
    # added (issue 21): token-classification rows, a list of words and one BIO tag per word (JSON lines; CoNLL
    # column files give their rows these fields)
    tokens_field: str = rule("tokens")
    tags_field: str = rule("tags")

    def extra_problems(self) -> List[str]:
        # an empty string would pass for an HF dataset id, which validate does not download
        problems = [f"data.{key}: must name a data file or an HF dataset id, got an empty string"
                    for key in ("train", "eval") if getattr(self, key) is not None and not getattr(self, key).strip()]
        for key in ("text_field", "prompt_field", "completion_field", "messages_field", "tokens_field", "tags_field"):
            if not getattr(self, key).strip():
                problems.append(f"data.{key}: must name a field of the rows, got an empty string")
        if self.prompt_field == self.completion_field:
            problems.append(f"data.completion_field: must differ from data.prompt_field, got {self.completion_field!r} "
                            f"for both")
        if self.tokens_field == self.tags_field:
            problems.append(f"data.tags_field: must differ from data.tokens_field, got {self.tags_field!r} for both")
        if self.chat_template is not None:
            problems += _chat_template_problems(self.chat_template)
        return problems


def _chat_template_problems(value: str) -> List[str]:
    """data.chat_template: a template (it holds `{%` or `{{`) or an existing file; a file is read when each
    trial's settings are built, so that workers need no copy of it."""
    from trainers.records import is_template_text

    if not value.strip():
        return ["data.chat_template: must be a Jinja template or the path of a file holding one, got an empty string"]
    if is_template_text(value) or os.path.isfile(os.path.expanduser(value)):
        return []
    return [f"data.chat_template: {value!r} is neither a Jinja template (no {{% or {{{{ in it) nor an existing file"]


def _training_rule(name: str):
    return rule(TRAINING_PARAMS[name].default, param=TRAINING_PARAMS[name])


@dataclass(frozen=True)
class TrainingSection(Section):
    """Fixed training values (the defaults for keys that `space:` does not search)."""
    PATH = "training"
    learning_rate: float = _training_rule("learning_rate")
    epochs: int = _training_rule("epochs")
    batch_size: int = _training_rule("batch_size")
    gradient_accumulation_steps: int = _training_rule("gradient_accumulation_steps")
    warmup_ratio: float = _training_rule("warmup_ratio")
    weight_decay: float = _training_rule("weight_decay")
    max_grad_norm: float = _training_rule("max_grad_norm")   # added
    max_steps: Optional[int] = _training_rule("max_steps")   # cap on optimizer steps (smoke runs)
    # plateau stopping. A trial stops after this many eval rounds in a row in which the objective's
    # eval metric (eval_loss if the objective has none) did not improve by more than the min delta; it
    # counts as finished (COMPLETE) with its last round's adapter and metrics. null: never stops early.
    early_stopping_patience: Optional[int] = rule(None, "int", low=1, nullable=True)
    early_stopping_min_delta: float = rule(0.0, "float", low=0)   # smaller gains count as no gain
    # adamw (torch) | paged_adamw_8bit (bitsandbytes, CUDA GPUs only: 8-bit state, a quarter of
    # AdamW's, paged to CPU memory when the GPU runs short; QLoRA's optimizer)
    optimizer: str = rule("adamw", choices=OPTIMIZERS)


@dataclass(frozen=True)
class ObjectiveSection(Section):
    """One metric, or several (a list) for multi-objective search (nsga2); `mode` per metric."""
    PATH = "objective"
    # one name (str), or several (tuple) for multi-objective search; empty: the task's default
    metric: Union[str, Tuple[str, ...]] = rule((), "names")
    mode: Union[str, Tuple[str, ...]] = rule((), "names", choices=("min", "max"))
    # what the task is judged as (search/spec/guidance.py): the PEFT guide's data minimums and quality bar
    task_kind: Optional[str] = rule(None, nullable=True, choices=TASK_KINDS)
    threshold: Optional[float] = rule(None, "float", nullable=True)   # the user's own bar on the first metric

    @property
    def metrics(self) -> Tuple[str, ...]:
        return (self.metric,) if isinstance(self.metric, str) else tuple(self.metric)

    @property
    def modes(self) -> Tuple[str, ...]:
        return (self.mode,) if isinstance(self.mode, str) else tuple(self.mode)

    def field_problems(self) -> List[str]:  # () means "not given yet": allowed until the task fills it
        if self.metric == () and self.mode == ():
            return []
        if self.mode == ():
            return [p for p in super().field_problems() if not p.startswith("objective.mode")]
        return super().field_problems()

    def extra_problems(self) -> List[str]:
        problems = []
        for name in self.metrics:
            if not (name.startswith("eval_") or name in SYSTEM_METRICS):
                problems.append(f"objective.metric: must be an eval_* metric (eval_loss, eval_accuracy, ...) "
                                f"or one of {', '.join(SYSTEM_METRICS)}, got {name!r}")
        if self.modes and len(self.modes) != len(self.metrics):
            problems.append(f"objective.mode: needs one mode per metric ({len(self.metrics)}), got {len(self.modes)}")
        return problems


@dataclass(frozen=True)
class SearchSection(Section):
    PATH = "search"
    algorithm: str = rule("gp", choices=ALGORITHMS)
    trials: int = rule(20, "int", low=1)
    concurrency: int = rule(1, "int", low=1)
    scheduler: str = rule("asha", choices=SCHEDULERS)
    seed: int = rule(0, "int", low=0)               # sampler, data split and trial seeds
    # eval rounds per epoch; one round = one report = ASHA's time unit
    evals_per_epoch: int = rule(1, "int", low=1)
    grace_rounds: int = rule(1, "int", low=1)       # rounds before ASHA may stop a trial
    reduction_factor: int = rule(3, "int", low=2)   # ASHA keeps 1/reduction_factor per rung
    # times a trial is retried, from its last round's checkpoint, when a worker process dies
    # (killed, node lost); a failure that would repeat (divergence, out of memory) is never retried
    max_failures: int = rule(2, "int", low=0)
    # trials each worker group trains at once on its one base (packed LoRA, trainers/packing/pack.py): each
    # keeps its own rows, adapter, optimizer and reports; up to concurrency * pack trials run at a time.
    # auto: a short probe calibrates a cost model (trainers/packing/cost_model.py) and picks the largest K that fits
    # the memory budget and still adds >= 5% tokens/s, at most pack_max (search/run/packing.py)
    pack: Union[int, str] = rule(1, "int", low=1, words=("auto",))
    # the largest K that pack: auto may choose (also capped by trials / concurrency); concurrency * K
    # trials run at once, each sampled without the results of the others, so a small search may want less
    pack_max: int = rule(16, "int", low=1)
    # pack: auto adds a member only while it adds at least this share of predicted tokens/s;
    # 0: as many as fit the memory budget (up to pack_max)
    pack_min_gain: float = rule(0.05, "float", low=0, high=1)
    # refine the space every this many finished trials (0: off; the first time once 10 trials are
    # complete): fix settings that do not matter, narrow those that do (search/refine/refiner.py)
    refine_every: int = rule(0, "int", low=0)
    # a LOW-rated setting is fixed only when every importance (fANOVA, PED-ANOVA; they sum to 1)
    # is below this; higher fixes more, sooner
    refine_min_importance: float = rule(0.1, "float", low=0, high=1)
    # a narrowed range keeps at least this share of the original (log scale for log ranges);
    # lower narrows harder and risks cutting off the optimum
    refine_min_width: float = rule(0.25, "float", low=0, low_open=True, high=1)

    def extra_problems(self) -> List[str]:
        if not self.refine_every:
            return []
        if self.algorithm in ("gp", "grid", "nsga2"):
            # gp: the refined region is imposed by redrawing the sampler's proposal (search/refine/sampler.py),
            # and a GP's acquisition maximum comes back the same on every redraw
            return [f"search.refine_every: refinement works with algorithm tpe or random (one objective), "
                    f"not {self.algorithm}; set refine_every: 0 or algorithm: tpe, got {self.refine_every}"]
        if self.refine_every >= self.trials:
            return [f"search.refine_every: must be < search.trials ({self.trials}) or no trial would run in "
                    f"the refined space, got {self.refine_every}"]
        return []


@dataclass(frozen=True)
class GenerationSection(Section):
    """Generation-based evaluation of causal-lm rows that hold a reference answer (prompt-completion: the
    completion; messages: the last assistant turn): each eval round a trial answers a seeded subset of its eval
    rows and scores the answers (trainers/generation.py). Text rows have no reference and generate nothing."""
    PATH = "generation"
    rows: int = rule(32, "int", low=0)              # eval rows answered each round, the same in every trial; 0: off
    max_new_tokens: int = rule(64, "int", low=1)    # an answer's length limit (it also stops at end of turn)
    batch_size: int = rule(16, "int", low=1)        # rows answered at once
    examples: int = rule(5, "int", low=0)           # rows the report shows: prompt, reference, answers
    # the first trial also answers with its adapter off: the base model's zero-shot score beside the best trial's
    base_model: bool = rule(True, "bool")


@dataclass(frozen=True)
class DeepSpeedSection(Section):
    PATH = "resources.deepspeed"
    enabled: bool = rule(True, "bool")              # `deepspeed: false` turns it off
    zero_stage: int = rule(2, "int", low=0, high=3)  # 2: sharded optimizer state and gradients; 3: weights too
    # optimizer state and step in CPU memory: a larger model fits the GPU, each step is slower
    offload_optimizer: str = rule("none", choices=OFFLOAD_DEVICES)
    # weights in CPU memory between uses (stage 3 only): larger still, slower still
    offload_param: str = rule("none", choices=OFFLOAD_DEVICES)
    # a DeepSpeed JSON file of your own, merged under the generated config (trainers/deepspeed_config.py)
    config: Optional[str] = rule(None, nullable=True)

    def extra_problems(self) -> List[str]:
        problems = []
        if self.offload_param != "none" and self.zero_stage != 3:
            problems.append(f"resources.deepspeed.offload_param: parameter offload needs zero_stage 3 (the only "
                            f"stage that partitions the weights), got zero_stage={self.zero_stage}")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            problems.append("resources.deepspeed.offload_optimizer: optimizer offload needs zero_stage >= 1 "
                            "(stage 0 keeps no optimizer state of its own), got zero_stage=0")
        if not self.enabled:
            given = [f"{key}={getattr(self, key)}" for key in ("offload_optimizer", "offload_param", "config")
                     if getattr(self, key) not in ("none", None)]
            if given:
                problems.append(f"resources.deepspeed.enabled: {', '.join(given)} need(s) DeepSpeed; set "
                                f"enabled: true or remove them, got enabled=false")
        return problems


@dataclass(frozen=True)
class ResourcesSection(Section):
    PATH = "resources"
    workers_per_trial: int = rule(1, "int", low=1)
    gpus_per_worker: float = rule(0.0, "float", low=0)   # fractions share a GPU between trials
    cpus_per_worker: float = rule(1.0, "float", low=0, low_open=True)  # logical CPUs Ray reserves per worker
    # past this resident memory a worker's trial fails "out of memory" (trainers/memory_guard.py)
    memory_per_worker_gb: Optional[float] = rule(None, "float", nullable=True, low=0, low_open=True)
    # GiB one worker group's pack may plan to use (search.pack: auto): device memory on a GPU, host
    # memory on CPU. null: measured free memory x this group's share x 0.85 (trainers/packing/probe.py)
    memory_budget_gb: Optional[float] = rule(None, "float", low=0, low_open=True, nullable=True)
    deepspeed: DeepSpeedSection = rule(type="section", section=DeepSpeedSection)
    # s3://BUCKET/PREFIX (or a directory every node sees) that receives Ray's state, every trial's
    # directory and the outputs under <storage_path>/<name>/, so a cluster needs no shared filesystem
    # (search/store/remote.py); null: the run directory only
    storage_path: Optional[str] = rule(None, nullable=True)

    def extra_problems(self) -> List[str]:
        from search.store.remote import storage_path_problems

        problems = storage_path_problems(self.storage_path)
        gpus = self.gpus_per_worker
        if gpus > 1 and not gpus.is_integer():
            return problems + [f"resources.gpus_per_worker: must be a whole number, or a fraction below 1 to share "
                               f"a GPU, got {gpus}"]
        if self.workers_per_trial > 1 and not gpus.is_integer():
            return problems + [
                f"resources.gpus_per_worker: a fraction shares one GPU between workers, but each rank of a "
                f"multi-worker trial needs a GPU of its own (NCCL refuses two ranks on one device); use a "
                f"whole number or workers_per_trial: 1, got {gpus} with workers_per_trial={self.workers_per_trial}"]
        return problems


@dataclass(frozen=True)
class TrackingSection(Section):
    PATH = "tracking"
    wandb: str = rule("offline", choices=WANDB_MODES)
    project: Optional[str] = rule(None, nullable=True)    # W&B project (default: the spec's name)
    entity: Optional[str] = rule(None, nullable=True)     # added
    # added, discouraged: prefer the WANDB_API_KEY environment variable; redacted in spec.yaml
    api_key: Optional[str] = rule(None, nullable=True, repr=False)


def name_problems(name: Any) -> List[str]:
    """`name:` becomes RUNS_DIR/<name>/, so it must stay one directory inside RUNS_DIR."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        return [f"name: must match {NAME_PATTERN} (it names the run directory), got {show(name)}"]
    if name in (".", ".."):   # they match the pattern, but would be RUNS_DIR itself or its parent
        return [f"name: {name!r} would make the run directory RUNS_DIR itself or its parent, not a directory "
                f"inside it; choose a name such as quickstart"]
    if len(name) > NAME_MAX_LENGTH:
        return [f"name: must be at most {NAME_MAX_LENGTH} characters (it names the run directory), got {len(name)}"]
    return []


STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2")


def storage_problems(url: object, check_environment: bool = True) -> List[str]:
    """Problems of `storage:` ("sqlite", "sqlite:///PATH", "postgresql[+psycopg2]://user:pw@host/db")."""
    if not isinstance(url, str) or not url:
        return [f"storage: must be 'sqlite' or a database URL, got {url!r}"]
    if url == "sqlite":
        return []
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme not in STORAGE_SCHEMES:
        return [f"storage: unknown scheme {scheme or url!r}; use sqlite (in the run directory), "
                f"sqlite:///PATH, postgresql://USER:PASSWORD@HOST/DB or postgresql+psycopg2://..., "
                f"got {redact_url(url)!r}"]
    if scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            return [f"storage: a sqlite URL needs a file path (sqlite:///relative.db or sqlite:////abs.db), got {url!r}"]
        parent = os.path.dirname(os.path.abspath(path))
        if check_environment and not os.path.isdir(parent):
            return [f"storage: directory {parent} of the sqlite file does not exist, got {url!r}"]
        return []
    parts = urlsplit(url)
    problems = []
    if not parts.hostname or not parts.path.strip("/"):
        problems.append(f"storage: a postgresql URL needs a host and a database name "
                        f"(postgresql://USER:PASSWORD@HOST/DB), got {redact_url(url)!r}")
    if check_environment and importlib.util.find_spec("psycopg2") is None:
        problems.append(f"storage: postgresql storage needs the psycopg2 driver: {INSTALL_HINT}")
    return problems
