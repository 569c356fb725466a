"""What one trial needs to know, as frozen dataclasses.

This is the contract between the search (which builds these from a spec and a set of sampled
parameters) and the trainer recipe (which runs them). Nothing here imports Ray, torch or
transformers, so it is cheap to build and pickle across processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

TASKS = ("sequence-classification", "causal-lm", "token-classification")
QUANTIZATIONS = ("none", "nf4", "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
OFFLOAD_DEVICES = ("none", "cpu")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
PEFT_METHODS = ("lora", "prompt-tuning", "prefix-tuning", "ia3")
# Row formats of causal-lm data (TRL's): one text; a prompt and its completion (strings, or lists of chat
# messages); a conversation (chat messages) rendered with the chat template.
DATA_FORMATS = ("text", "prompt-completion", "messages")
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ModelSettings:
    name_or_path: str                 # HF hub id, local directory, or built-in alias (`minilm`)
    task: str = "sequence-classification"
    quantization: str = "none"        # none | nf4 | int8  (QLoRA = lora + nf4)
    dtype: str = "auto"               # auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU |
                                      # float32 | bfloat16 | float16 (fp16 trains with loss scaling)
    # Speed options (trainers/kernels.py); off where they change rounding or need an extra package.
    attn_implementation: Optional[str] = None  # None: transformers' choice (sdpa where the model has it) |
                                      # sdpa | eager | flash_attention_2 (needs flash-attn)
    liger_kernel: bool = False        # Liger Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy):
                                      # faster, no logits tensor; needs a CUDA GPU and liger-kernel
    autocast: Optional[bool] = None   # forward under torch.autocast(compute dtype), adapter weights stay fp32:
                                      # no fp32 copies of activations for the adapters (less memory, faster).
                                      # None: on for nf4/int8 in bf16/fp16 (QLoRA's recipe), off otherwise
    gradient_checkpointing: Optional[bool] = None  # None: on for nf4/int8 (the QLoRA recipe), off otherwise;
                                      # on saves most activation memory for ~30% more compute
    compile: bool = False             # torch.compile each transformer block; the first steps compile. Helps bf16
                                      # LoRA on a GPU; with nf4 slower and more memory (bitsandbytes' layers)


@dataclass(frozen=True)
class DataSettings:
    train: str                        # .jsonl / .csv / .txt path, or an HF dataset id
    eval: Optional[str] = None        # None: a seeded split of train
    text_field: str = "text"
    label_field: Optional[str] = "label"   # sequence-classification only
    max_length: int = 128
    eval_fraction: float = 0.2        # share of train held out when eval is None
    split_seed: int = 0               # the held-out split must not change between trials
    # causal-lm row format: text | prompt-completion | messages; None: from train's first row (its fields)
    format: Optional[str] = None
    prompt_field: str = "prompt"      # prompt-completion: a string, or a list of {role, content} messages
    completion_field: str = "completion"   # the same type as the prompt; the part the loss covers
    messages_field: str = "messages"  # messages: a list of {role, content}, roles system | user | assistant
    # Jinja chat template (its text, not a path), used instead of the tokenizer's; None: the tokenizer's own
    chat_template: Optional[str] = None
    # prompt-completion and messages: the loss covers the completion (assistant turns) only; False: every token
    completion_only_loss: bool = True
    # token-classification rows (trainers/token_data.py): a list of words and one BIO tag per word
    tokens_field: str = "tokens"
    tags_field: str = "tags"


@dataclass(frozen=True)
class PeftSettings:
    method: str = "lora"              # lora | prompt-tuning | prefix-tuning | ia3
    # Method parameters with their final values, as PEFT names them where possible:
    #   lora: r, lora_alpha, lora_dropout, target_modules (list or "auto"), use_rslora, use_dora
    #   prompt-tuning: num_virtual_tokens, prompt_init (random | sample-vocab | text), prompt_init_text
    #   prefix-tuning: num_virtual_tokens
    #   ia3: target_modules, feedforward_modules
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSettings:
    learning_rate: float = 2e-4
    epochs: int = 3
    batch_size: int = 16              # per worker, per micro-step
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    evals_per_epoch: int = 1          # eval rounds per epoch; each round is one report (ASHA's time unit)
    max_steps: Optional[int] = None   # cap on optimizer steps (tests, benchmarks)
    optimizer: str = "adamw"          # adamw (torch) | paged_adamw_8bit (bitsandbytes; CUDA only: 8-bit state
                                      # paged to CPU memory under pressure, QLoRA's optimizer)
    seed: int = 0
    # Plateau stopping: after this many eval rounds in a row in which `monitor` did not improve by more
    # than early_stopping_min_delta, the trial ends there as a finished trial. None: never.
    early_stopping_patience: Optional[int] = None
    early_stopping_min_delta: float = 0.0
    monitor: str = "eval_loss"        # the eval metric plateau stopping watches (the objective's, from a spec)
    monitor_mode: str = "min"         # min | max: which way `monitor` improves


@dataclass(frozen=True)
class EngineSettings:
    deepspeed: bool = True            # under torch.distributed (Ray Train), wrap in a DeepSpeed engine
    zero_stage: int = 2               # ZeRO stage 0-3
    offload_optimizer: str = "none"   # none | cpu: optimizer state and step in CPU memory (stage 1-3)
    offload_param: str = "none"       # none | cpu: weights in CPU memory between uses (stage 3 only)
    # The user's own DeepSpeed JSON (its contents, so workers on other nodes need no file), merged under
    # the generated config; a key the settings decide must agree with them (trainers/deepspeed_config.py).
    user_config: Mapping[str, Any] = field(default_factory=dict)
    num_threads: Optional[int] = None # torch intra-op threads; None leaves torch's default
    host_memory_mb: Optional[float] = None   # this worker's resident memory cap (trainers/memory_guard.py)


# Keys of a report's generation results (trainers/generation.py), also stored on the Optuna trial
ANSWERS_KEY = "answers"              # a few example rows: prompt, reference, answer
BASE_PREFIX = "base_"                # base_eval_rougeL, base_answers...: the same with the adapter off (zero-shot)
GENERATE_SECONDS_KEY = "generate_s"  # the round's seconds spent generating
# The scores of generated answers (trainers/generation.py), each in [0, 1], higher is better
GENERATION_METRICS = ("eval_exact_match", "eval_token_f1", "eval_rougeL", "eval_chrf")


@dataclass(frozen=True)
class GenerationSettings:
    """Generation-based evaluation of causal-lm rows with a reference answer (prompt-completion, messages):
    each eval round the trial answers a seeded subset of eval rows (trainers/generation.py)."""
    rows: int = 0                     # eval rows answered each round, the same ones in every round and trial; 0: off
    max_new_tokens: int = 64
    batch_size: int = 16              # rows answered at once (left-padded, greedy, with the KV cache)
    seed: int = 0                     # picks the rows
    examples: int = 5                 # rows whose prompt, reference and answer each report carries
    base_answers: bool = False        # also answer with the adapter off once: the base model's zero-shot score


@dataclass(frozen=True)
class TrialSettings:
    model: ModelSettings
    data: DataSettings
    peft: PeftSettings = field(default_factory=PeftSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
