"""Checks of a spec against the outside world: data files and the model (inspected, not loaded).

Each function returns problems (`key.path: what is wrong, got X`); none raises for bad input.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from search.spec.sections import GENERATION_MODES, DataSection
from spaces import targets as target_presets
from spaces.kinds import Kind, RatioTo
from trainers.hub import MODEL_ALIASES, looks_like_local_path
from trainers.records import DataError, is_local_source, read_records

_MAX_SHOWN = 8


def _fields_of(rows: Sequence[Mapping[str, Any]]) -> str:
    names = sorted({str(key) for row in rows[:100] for key in row})
    return ", ".join(names[:_MAX_SHOWN]) + (", ..." if len(names) > _MAX_SHOWN else "") or "none"


def _missing_field(rows: Sequence[Mapping[str, Any]], name: str) -> List[int]:
    return [index for index, row in enumerate(rows, start=1)
            if row.get(name) is None or (isinstance(row.get(name), str) and not row.get(name).strip())]


def _not_text(rows: Sequence[Mapping[str, Any]], name: str) -> List[int]:
    """Rows whose text is there but not a string (a JSON number or list): the tokenizer takes only text."""
    return [index for index, row in enumerate(rows, start=1)
            if row.get(name) is not None and not isinstance(row.get(name), str)]


def _hub_id_problems(key: str, source: str) -> List[str]:
    """A source that is no local file must at least be spelt as an HF dataset id (checked offline), so a
    mistyped path such as `inputs/data/train` is caught now, not when the run tries to download it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError as exc:
        reason = str(exc).split(". Use `repo_type`")[0].rstrip(".")
        return [f"data.{key}: {source!r} is neither an existing local file nor an HF dataset id ({reason})"]
    return []


def local_rows(data: DataSection, read: Callable[[str, str], Sequence[Mapping[str, Any]]],
               problems: List[str]) -> Dict[str, Sequence[Mapping[str, Any]]]:
    """{"train": rows, "eval": rows} of the sources that are local files, read by `read(source, key)`. A missing,
    unreadable or empty file adds its problem to `problems`; a source that is no local file is checked as an HF
    dataset id (a hub dataset is loaded when the run starts: validate downloads nothing)."""
    rows_by_key: Dict[str, Sequence[Mapping[str, Any]]] = {}
    for key in ("train", "eval"):
        source = getattr(data, key)
        if source is None:
            continue
        if not is_local_source(source):
            if importlib.util.find_spec("datasets") is None:
                problems.append(f"data.{key}: {source!r} is not a local file, and HF dataset ids need "
                                f"pip install 'peft-search[hub-datasets]'")
            problems += _hub_id_problems(key, source)
            continue
        try:
            rows = read(source, key)
        except DataError as exc:
            problems.append(f"data.{key}: {exc} (relative paths are read from the spec file's directory)"
                            if "no such file" in str(exc) else f"data.{key}: {exc}")
            continue
        if not rows:
            problems.append(f"data.{key}: has no rows, got an empty file {source}")
            continue
        rows_by_key[key] = rows
    return rows_by_key


def data_problems(data: DataSection, task: str) -> List[str]:
    """Files exist, have rows, and every row has the fields of its format: the text (a string) and label
    field, or a prompt and completion, or a conversation (trainers/data.py: each bad row named by its file,
    row and field); a source that is no local file is spelt as an HF dataset id."""
    from trainers.data import CAUSAL_LM, TEXT, TOKEN_CLASSIFICATION, resolve_format, rows_problems

    if task == TOKEN_CLASSIFICATION:
        from search.spec.token_checks import token_data_problems

        return token_data_problems(data)
    problems: List[str] = []
    if task != CAUSAL_LM and data.format not in (None, TEXT):
        problems.append(f"data.format: {task} reads data.text_field (and data.label_field); prompt-completion and "
                        f"messages rows are for causal-lm, got {data.format!r}")
        return problems
    rows_by_key = local_rows(data, lambda source, key: read_records(source, split=key), problems)
    fmt: Optional[str] = None
    for key, rows in rows_by_key.items():
        if fmt is None:   # train's first row decides (eval's where train is a hub dataset)
            try:
                fmt = resolve_format(data, task, rows)
            except DataError as exc:
                problems.append(f"data.format: {exc}")
                return problems
        if fmt != TEXT:
            shown, bad = rows_problems(rows, data, fmt, split=key, limit=_MAX_SHOWN)
            problems += [f"data.{key}: {problem}" for problem in shown]
            if bad > len(shown):
                problems.append(f"data.{key}: {bad} of {len(rows)} rows are bad for the {fmt} format "
                                f"(the first {len(shown)} above)")
            continue
        fields = [("text_field", data.text_field)]
        if task == "sequence-classification" and data.label_field:
            fields.append(("label_field", data.label_field))
        for field_key, name in fields:
            missing = _missing_field(rows, name)
            if missing:
                hint = ""
                if field_key == "text_field" and task == CAUSAL_LM and data.format is None:
                    hint = ("; prompt-completion or chat rows need their fields: data.prompt_field and "
                            "data.completion_field, or data.messages_field (or data.format)")
                problems.append(f"data.{field_key}: {name!r} is missing or empty in {len(missing)} of {len(rows)} rows "
                                f"of data.{key} (first: row {missing[0]}); the rows have: {_fields_of(rows)}{hint}")
        not_text = _not_text(rows, data.text_field)
        if not_text:
            first = rows[not_text[0] - 1][data.text_field]
            problems.append(f"data.text_field: {data.text_field!r} is not a string in {len(not_text)} of {len(rows)} "
                            f"rows of data.{key} (first: row {not_text[0]}, got {type(first).__name__})")
    train = rows_by_key.get("train")
    if train and data.eval is None and int(len(train) * data.eval_fraction) < 1:
        problems.append(f"data.eval_fraction: {data.eval_fraction} of {len(train)} rows leaves no eval row; "
                        f"give data.eval or more rows, got {data.eval_fraction}")
    if task == "sequence-classification" and data.label_field and train:
        labels = {str(row.get(data.label_field)) for row in train if row.get(data.label_field) is not None}
        if len(labels) == 1:
            problems.append(f"data.label_field: needs at least 2 distinct labels in data.train, got only {labels.pop()!r}")
        eval_rows = rows_by_key.get("eval")
        if eval_rows and len(labels) > 1:
            unseen = sorted({str(row.get(data.label_field)) for row in eval_rows
                             if row.get(data.label_field) is not None} - labels)
            if unseen:
                problems.append(f"data.eval: labels not in data.train: {', '.join(unseen[:_MAX_SHOWN])}")
    return problems


# More eval rows than this share copied from train, and the eval metrics measure memorisation: invalid.
OVERLAP_ERROR_SHARE = 0.5


def overlap_findings(data, task: str = "causal-lm") -> Tuple[List[str], List[str]]:
    """(problems, warnings) about eval rows that also appear among the train rows the trials use.

    `data`: the trials' trainers.settings.DataSettings, so that a held-out split of data.train is the
    split the trials get. Exact copies of more than half the eval rows are a problem; fewer copies, or
    near copies (trainers/diagnostics.py), a warning. Hub datasets are skipped: validate downloads nothing.
    A prompt-completion or chat row is compared by its words (prompt and completion, or every turn).
    """
    from trainers.data import row_text, split_with_format
    from trainers.diagnostics import NEAR_JACCARD, SHINGLE_WORDS, text_overlap

    if not is_local_source(data.train) or (data.eval is not None and not is_local_source(data.eval)):
        return [], []
    try:
        train_rows, eval_rows, fmt = split_with_format(data, task)
    except DataError:
        return [], []   # data_problems has said what is wrong with the files

    def texts(rows: Sequence[Mapping[str, Any]]) -> List[str]:
        return [text for text in (row_text(row, data, fmt) for row in rows) if isinstance(text, str)]

    overlap = text_overlap(texts(train_rows), texts(eval_rows))
    if not overlap.exact and not overlap.near:
        return [], []
    # A held-out split overlaps when data.train repeats rows: the key to fix is data.train then.
    where, rows, train, fix = (("data.eval", "eval rows", "data.train", "remove them from data.eval") if data.eval else
                               ("data.train", "rows held out for eval", "the rows trained on", "deduplicate data.train"))
    near = f"near duplicates (word {SHINGLE_WORDS}-gram Jaccard >= {NEAR_JACCARD})"
    if overlap.exact:
        message = (f"{where}: {len(overlap.exact)} of {overlap.eval_rows} {rows} also appear in {train} "
                   f"(the same text after casefolding and collapsing whitespace)")
        message += f", and {len(overlap.near)} more are {near}" if overlap.near else ""
    else:
        message = f"{where}: {len(overlap.near)} of {overlap.eval_rows} {rows} are {near} of rows in {train}"
    if len(overlap.exact) > OVERLAP_ERROR_SHARE * overlap.eval_rows:
        return [f"{message}; the eval metrics would measure memorisation: {fix}"], []
    return [], [f"warning: {message}; eval metrics on them overstate generalisation"]


def inspect_reference(name_or_path: str, task: str):
    """(ModelShape or None, problems). Skips (no problem) a hub id that would be downloaded at run time."""
    from trainers.inspect import ModelReferenceError, inspect_model

    expanded = os.path.expanduser(name_or_path)
    local = name_or_path in MODEL_ALIASES or os.path.isdir(expanded)
    if not local and looks_like_local_path(name_or_path):
        return None, [f"model.name_or_path: no such directory, got {name_or_path!r}"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return inspect_model(name_or_path, task), []
    except ModelReferenceError as exc:
        if local or offline:
            return None, [f"model.name_or_path: {exc}"]
        return None, []  # a hub id, not cached: transformers downloads it when the trial starts


def _where(key: str, space: Mapping[str, Kind], home: str = "peft") -> str:
    return f"space.{key}" if key in space else f"{home}.{key}"


def _candidates(key: str, fixed: Mapping[str, Any], space: Mapping[str, Kind]) -> List[Any]:
    """Every value `key` may take: the fixed one, or each choice / the bounds of the searched one."""
    if key in space and not isinstance(space[key], RatioTo):
        return [value for _subpath, value in space[key].extremes()]
    return [fixed.get(key)]


def resolve_modules(requested: Any, model_type: str, method: str, feedforward: bool = False) -> Any:
    """'auto' -> the preset list (UnknownArchitecture when there is none); lists and 'all-linear' as given."""
    if requested != "auto":
        return list(requested) if isinstance(requested, (list, tuple)) else requested
    if feedforward:
        return target_presets.preset_feedforward_modules(model_type)
    return target_presets.preset_target_modules(model_type, method)


def shape_problems(shape, method: str, fixed: Mapping[str, Any], space: Mapping[str, Kind],
                   max_length_where: str) -> List[str]:
    """Target modules exist, ranks fit the targeted layers, virtual tokens fit the positions, the method can
    train this model with the installed libraries."""
    problems: List[str] = []
    if method == "prefix-tuning" and shape.prefix_tuning_problem:
        problems.append(f"peft.method: {shape.prefix_tuning_problem}")
    if "target_modules" in fixed or "target_modules" in space:
        where = _where("target_modules", space)
        for requested in _candidates("target_modules", fixed, space):
            try:
                modules = resolve_modules(requested, shape.model_type, method)
            except target_presets.UnknownArchitecture as exc:
                problems.append(f"{where}: {exc}")
                continue
            problems += [f"{where}: {message}" for message in target_presets.check_target_modules(shape, modules)]
            if problems:
                continue
            if "r" in fixed or "r" in space:
                largest_rank = max(_candidates("r", fixed, space))
                smallest = target_presets.smallest_dimension(shape, modules)
                if smallest is not None and largest_rank > smallest:
                    shown = modules if isinstance(modules, str) else ", ".join(modules)
                    problems.append(f"{_where('r', space)}: rank must be <= {smallest}, the smallest dimension "
                                    f"of the targeted layers ({shown}), got {largest_rank}")
            if method == "ia3":
                problems += _feedforward_problems(shape, modules, fixed, space)
    positions = shape.max_position_embeddings
    if positions:
        longest = max(_candidates("max_length", fixed, space))
        tokens = max(_candidates("num_virtual_tokens", fixed, space)) if "num_virtual_tokens" in fixed else 0
        if longest > positions:
            problems.append(f"{max_length_where}: must be <= {positions} (the model's max_position_embeddings), got {longest}")
        elif longest + tokens > positions:
            problems.append(f"{_where('num_virtual_tokens', space)}: num_virtual_tokens + max_length must be <= "
                            f"{positions} (the model's max_position_embeddings), got {tokens} + {longest}")
    return problems


def _feedforward_problems(shape, targets: Any, fixed: Mapping[str, Any], space: Mapping[str, Kind]) -> List[str]:
    where = _where("feedforward_modules", space)
    problems = []
    for requested in _candidates("feedforward_modules", fixed, space):
        try:
            feedforward = resolve_modules(requested, shape.model_type, "ia3", feedforward=True)
        except target_presets.UnknownArchitecture as exc:
            problems.append(f"{where}: {exc}")
            continue
        if requested == "auto" and fixed.get("target_modules") != "auto":
            continue  # the preset is cut down to the given targets when the trial is built
        problems += [f"{where}: {message}" for message in target_presets.check_target_modules(shape, feedforward)]
        outside = [name for name in feedforward if name not in targets]
        if outside:
            problems.append(f"{where}: feed-forward modules must also be target modules "
                            f"({', '.join(targets)}), got {', '.join(outside)}")
    return problems


# Training values that reach the DeepSpeed config, and may be searched.
_DEEPSPEED_TRAINING_KEYS = ("batch_size", "gradient_accumulation_steps", "max_grad_norm")


def deepspeed_config_problems(model, training, resources, space: Mapping[str, Kind]) -> List[str]:
    """resources.deepspeed.config: a readable JSON object that agrees with the spec, for every value a
    searched batch size, accumulation or clipping may take (trainers/deepspeed_config.py has the rules)."""
    from dataclasses import fields

    from trainers.deepspeed_config import DeepSpeedConfigError, conflicts, generated_config, read_user_config
    from trainers.settings import EngineSettings, TrainingSettings

    deepspeed = resources.deepspeed
    if not deepspeed.enabled or not deepspeed.config:
        return []
    try:
        user = read_user_config(deepspeed.config)
    except DeepSpeedConfigError as exc:
        return exc.problems
    fixed = {f.name: getattr(training, f.name) for f in fields(training)}
    engine = EngineSettings(zero_stage=deepspeed.zero_stage, offload_optimizer=deepspeed.offload_optimizer,
                            offload_param=deepspeed.offload_param)
    precision = _spec_precision(model.dtype, resources.gpus_per_worker)
    problems: List[str] = []
    for values in itertools.product(*(_candidates(key, fixed, space) for key in _DEEPSPEED_TRAINING_KEYS)):
        trial_training = TrainingSettings(**dict(zip(_DEEPSPEED_TRAINING_KEYS, values)))
        generated = generated_config(trial_training, engine, precision, resources.workers_per_trial)
        problems += [problem for problem in conflicts(user, generated) if problem not in problems]
    return problems


def _spec_precision(dtype: str, gpus_per_worker: float) -> Optional[str]:
    """The precision a trial will run in, where the spec tells (None: auto on GPUs, known when it starts)."""
    from trainers.deepspeed_config import precision_of

    if dtype != "auto":
        return precision_of(dtype)
    return None if gpus_per_worker else "fp32"


def local_gpu_count() -> int:
    """CUDA devices this process can use (CUDA_VISIBLE_DEVICES applies); 0 without CUDA or a CUDA torch."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def embedded_gpu_problems(resources, gpus_here: Optional[int] = None) -> List[str]:
    """GPUs a trial asks for that this machine lacks, for a search on the embedded local Ray.

    Embedded Ray offers only this machine's devices, and Ray keeps a trial that asks for more waiting for
    them forever, so it is refused before anything starts. On a cluster (--address / RAY_ADDRESS) the
    GPUs live on its nodes: this check does not apply there. `gpus_here`: the device count (None: ask torch).
    """
    asked = resources.gpus_per_worker
    if not asked:
        return []
    gpus_here = local_gpu_count() if gpus_here is None else gpus_here
    cluster = "or run on a cluster with --address"
    if gpus_here == 0:
        return [f"resources.gpus_per_worker: {asked:g} GPU per worker asked for, but this machine has no GPU "
                f"(embedded Ray); set 0, {cluster}"]
    per_trial = math.ceil(resources.workers_per_trial * asked)   # a fraction still needs a device to share
    if per_trial > gpus_here:
        return [f"resources.gpus_per_worker: a trial needs {per_trial} GPUs (workers_per_trial="
                f"{resources.workers_per_trial} x gpus_per_worker={asked:g}), but this machine has {gpus_here} "
                f"(embedded Ray); ask for fewer, {cluster}"]
    return []


# More rows than this share whose completion does not fit max_length: invalid (most trials would learn cut
# answers without their prompts). Fewer: a warning with the count.
UNFIT_ERROR_SHARE = 0.5
# validate tokenizes at most this many rows of each file for the count (the first ones).
FIT_ROWS_CHECKED = 10_000


def load_tokenizer(name_or_path: str):
    """The model's tokenizer as the trainer loads it, or None where it is not here (a hub id not cached)."""
    from trainers.hub import resolve_model_path

    try:
        from transformers import AutoTokenizer

        path = resolve_model_path(name_or_path)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:   # inspect_reference reports a model that cannot be read; a hub id loads at run time
        return None


def smallest_max_length(spec) -> Tuple[int, str]:
    """(the smallest max_length a trial may get, the key that sets it)."""
    if "max_length" in spec.space:
        return int(min(value for _subpath, value in spec.space["max_length"].extremes())), "space.max_length"
    return int(spec.data.max_length), "data.max_length"


def chat_data(spec):
    """(DataSettings, format, tokenizer) where the spec trains on prompt-completion or messages rows of local
    files and the tokenizer is here, else None. The format comes from data.format or train's first row."""
    from trainers.data import CAUSAL_LM, TEXT, resolve_format

    if spec.model.task != CAUSAL_LM or not is_local_source(spec.data.train):
        return None
    data = spec.trial_settings({}).data
    try:
        fmt = resolve_format(data, spec.model.task, read_records(data.train, split="train"))
    except DataError:
        return None   # data_problems has said what is wrong
    if fmt == TEXT:
        return None
    tokenizer = load_tokenizer(spec.model.name_or_path)
    return None if tokenizer is None else (data, fmt, tokenizer)


def generation_problems(spec) -> List[str]:
    """An objective scored on generated answers needs rows that hold a reference answer: not text rows."""
    from trainers.data import CAUSAL_LM, TEXT, resolve_format

    generated = [metric for metric in spec.objective.metrics if metric in GENERATION_MODES]
    if not generated or spec.model.task != CAUSAL_LM or not is_local_source(spec.data.train):
        return []
    try:
        fmt = resolve_format(spec.trial_settings({}).data, CAUSAL_LM, read_records(spec.data.train, split="train"))
    except DataError:
        return []   # data_problems has said what is wrong
    if fmt != TEXT:
        return []
    return [f"objective.metric: {', '.join(generated)} scores generated answers against each row's reference "
            f"answer, and text rows hold none; give prompt-completion or messages rows, got text rows in "
            f"{spec.data.train}"]


def completion_findings(spec) -> Tuple[List[str], List[str]]:
    """(problems, warnings) of rendering and tokenizing the prompt-completion or messages rows.

    A row the chat template cannot render (or no template at all) is a problem naming file, row and field.
    Rows whose completion (first to last completion token) is longer than the smallest max_length a trial may
    get are counted: a warning, or a problem when they are more than UNFIT_ERROR_SHARE of a file."""
    from trainers.data import NO_CHAT_TEMPLATE, encode_row

    found = chat_data(spec)
    if found is None:
        return [], []
    data, fmt, tokenizer = found
    max_length, where = smallest_max_length(spec)
    problems: List[str] = []
    warnings: List[str] = []
    for key in ("train", "eval"):
        source = getattr(data, key)
        if source is None or not is_local_source(source):
            continue
        try:
            rows = read_records(source, split=key)
        except DataError:
            continue
        checked = rows[:FIT_ROWS_CHECKED]
        unfit: List[Tuple[int, int]] = []   # (row index, completion tokens)
        bad = 0
        for index, row in enumerate(checked):
            try:
                _ids, mask = encode_row(row, tokenizer, data, fmt)
            except DataError as exc:
                if str(exc) == NO_CHAT_TEMPLATE:
                    return [f"data.chat_template: {spec.model.name_or_path}: {NO_CHAT_TEMPLATE}"], []
                bad += 1
                if bad <= _MAX_SHOWN:
                    problems.append(f"data.{key}: {rows.where(index)}: {exc}")
                continue
            trained = [position for position, value in enumerate(mask) if value]
            span = trained[-1] - trained[0] + 1
            if span > max_length:
                unfit.append((index, span))
        if bad > _MAX_SHOWN:
            problems.append(f"data.{key}: {bad} of {len(checked)} rows cannot be rendered "
                            f"(the first {_MAX_SHOWN} above)")
        if not unfit:
            continue
        of = f"{len(checked)} rows" if len(checked) == len(rows) else f"the first {len(checked)} rows"
        first, tokens = unfit[0]
        message = (f"{where}: the completions of {len(unfit)} of {of} of data.{key} do not fit {max_length} tokens "
                   f"(first: {rows.where(first)}, {tokens} completion tokens); such a row loses its prompt and the "
                   f"end of its completion")
        if len(unfit) > UNFIT_ERROR_SHARE * len(checked):
            problems.append(f"{message}; raise {where} or shorten the completions")
        else:
            warnings.append(f"warning: {message}")
    return problems, warnings
