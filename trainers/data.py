"""Rows -> tokenized batches for one trial: the eval split, the label mapping, sharding across ranks.

Everything that must not change between trials of one search is derived deterministically from the
DataSettings alone: the held-out split (split_seed) and the label mapping (sorted labels of train).

Causal-LM rows come in TRL's formats (DataSettings.format): `text` (the loss covers every token),
`prompt-completion` (strings joined, or chat messages rendered with the chat template) and `messages` (a
conversation rendered with the chat template). In the last two the loss covers the completion, or the
assistant turns, only (labels IGNORE_INDEX elsewhere) unless `completion_only_loss` is off. Which tokens
are the completion comes from the template's `{% generation %}` markers where it has them, otherwise from
rendering the conversation up to each assistant turn: the text the turn adds after the generation prompt is
the assistant's part; the characters of those parts are mapped to tokens by the tokenizer's offsets. Rows longer than max_length lose their prompt from the
left first; a completion longer than max_length alone keeps its start (`fit_to_length`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from trainers.distributed import DistContext
from trainers.records import DataError, read_records, row_place
from trainers.settings import CHAT_ROLES, DataSettings

CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
TOKEN_CLASSIFICATION = "token-classification"   # words + BIO tags: trainers/token_data.py
IGNORE_INDEX = -100          # what torch's cross-entropy skips: padding and prompt positions
KEEP = "keep"                # eval batches only: 0 for rows duplicated to even out the ranks' shards
TEXT, PROMPT_COMPLETION, MESSAGES = "text", "prompt-completion", "messages"
TOKENS = "tokens"            # the rows of token-classification: words and their tags
ASSISTANT = "assistant"
# A chat template that marks the assistant's part itself (what transformers' return_assistant_tokens_mask reads).
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
NO_CHAT_TEMPLATE = ("the tokenizer has no chat template; give one as data.chat_template (a Jinja template, "
                    "or the path of a file holding one)")


def split_records(data: DataSettings, task: Optional[str] = None) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(train rows, eval rows): data.eval if given, else a split of train seeded by data.split_seed.

    `task`: check every row of the format (`resolve_format`) first, so that a bad row is named by its file,
    row and field (DataError) before anything is split or tokenized."""
    train_rows, eval_rows, _fmt = split_with_format(data, task)
    return train_rows, eval_rows


def split_with_format(data: DataSettings, task: Optional[str]):
    """(train rows, eval rows, the rows' format); the rows of a chat format checked when `task` is given (as
    `split_records`); the format is data.format or that of train's first row (`resolve_format`)."""
    train = read_rows(data.train, data, task, split="train")
    fmt = resolve_format(data, task, train) if task is not None else TEXT
    if task is not None:
        check_rows(train, data, fmt, split="train")
    if data.eval:
        held = read_rows(data.eval, data, task, split="validation")
        if task is not None:
            check_rows(held, data, fmt, split="eval")
        return train, held, fmt
    if not 0.0 < data.eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in (0, 1) when data.eval is not given, got {data.eval_fraction}")
    order = list(range(len(train)))
    random.Random(data.split_seed).shuffle(order)
    n_eval = max(1, round(len(train) * data.eval_fraction))
    if n_eval >= len(train):
        raise DataError(f"{data.train}: {len(train)} rows are too few to hold out {data.eval_fraction:.0%} for eval")
    held_out = set(order[:n_eval])
    return ([row for i, row in enumerate(train) if i not in held_out],
            [row for i, row in enumerate(train) if i in held_out], fmt)


def read_rows(source: str, data: DataSettings, task: Optional[str], split: str = "train"):
    """The Records of `source`; token-classification also reads CoNLL column files (trainers/token_data.py)."""
    if task == TOKEN_CLASSIFICATION:
        from trainers.token_data import read_token_records

        return read_token_records(source, data, split=split)
    return read_records(source, split=split)


def label_mapping(train_rows: Sequence[Dict[str, Any]], label_field: str) -> Dict[str, int]:
    """Label (as a string) -> id, from the sorted unique labels of train: identical in every trial."""
    labels = set()
    for index, row in enumerate(train_rows):
        if row.get(label_field) is None:
            raise DataError(f"train row {index}: no {label_field!r} field (data.label_field)")
        labels.add(str(row[label_field]))
    if len(labels) < 2:
        raise DataError(f"train holds {len(labels)} distinct label(s) in {label_field!r}; classification needs >= 2")
    return {label: index for index, label in enumerate(sorted(labels))}


# --- row formats -------------------------------------------------------------------------------------
def format_fields(data: DataSettings, fmt: str) -> List[Tuple[str, str]]:
    """(spec key, field name) of the fields a row of format `fmt` needs."""
    if fmt == MESSAGES:
        return [("messages_field", data.messages_field)]
    if fmt == PROMPT_COMPLETION:
        return [("prompt_field", data.prompt_field), ("completion_field", data.completion_field)]
    return [("text_field", data.text_field)]


def resolve_format(data: DataSettings, task: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """data.format, else the format whose fields train's first row holds (TRL's rule): `messages`, then
    prompt + completion, then text. Classification always reads text. DataError where the first row holds the
    fields of more than one format: which one is meant must be said (data.format)."""
    if task == TOKEN_CLASSIFICATION:
        return TOKENS
    if task != CAUSAL_LM:
        return TEXT
    if data.format:
        return data.format
    if not rows or not isinstance(rows[0], Mapping):
        return TEXT
    first = rows[0]
    found = [fmt for fmt in (MESSAGES, PROMPT_COMPLETION, TEXT)
             if all(name in first for _key, name in format_fields(data, fmt))]
    if len(found) > 1:
        fields = ", ".join(repr(name) for fmt in found for _key, name in format_fields(data, fmt))
        raise DataError(f"{row_place(rows, 0)} holds the fields of several formats ({fields}): set data.format "
                        f"to one of {', '.join(found)}")
    return found[0] if found else TEXT


def json_kind(value: Any) -> str:
    """A JSON value's type in words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _messages_problem(messages: Sequence[Any], name: str) -> Optional[Tuple[str, str]]:
    """(field path, what is wrong) of the first bad message of a list, or None."""
    for index, message in enumerate(messages):
        where = f"{name}[{index}]"
        if not isinstance(message, Mapping):
            return where, f"must be a mapping with role and content, got {json_kind(message)}"
        role = message.get("role")
        if role not in CHAT_ROLES:
            return f"{where}.role", (f"must be one of {', '.join(CHAT_ROLES)}, got "
                                     f"{role!r}" if "role" in message else "missing")
        content = message.get("content")
        if not isinstance(content, str):
            return f"{where}.content", ("missing" if "content" not in message
                                        else f"must be a string, got {json_kind(content)}")
        if role == ASSISTANT and not content.strip():
            return f"{where}.content", "an empty assistant turn (nothing to learn)"
    return None


def row_problem(row: Any, data: DataSettings, fmt: str) -> Optional[Tuple[str, str]]:
    """(field, what is wrong) of a prompt-completion, messages or tokens row, or None when it can be trained on."""
    if fmt == TOKENS:
        from trainers.token_data import token_row_problem

        return token_row_problem(row, data)
    if not isinstance(row, Mapping):
        return "row", f"must be a mapping of fields, got {json_kind(row)}"
    if fmt == MESSAGES:
        name = data.messages_field
        messages = row.get(name)
        if messages is None:
            return name, "missing (data.messages_field)" if name not in row else "null, not a list of messages"
        if not isinstance(messages, (list, tuple)):
            return name, f"must be a list of {{role, content}} messages, got {json_kind(messages)}"
        if not messages:
            return name, "an empty conversation"
        problem = _messages_problem(messages, name)
        if problem:
            return problem
        if not any(message["role"] == ASSISTANT for message in messages):
            return name, "no assistant turn (nothing to learn)"
        if messages[0]["role"] == ASSISTANT:
            return (f"{name}[0].role",
                    "the conversation starts with an assistant turn; put a user (or system) turn first")
        return None
    if fmt != PROMPT_COMPLETION:
        name = data.text_field
        text = row.get(name)
        if text is None:
            return name, "missing (data.text_field)"
        return None if isinstance(text, str) else (name, f"must be a string, got {json_kind(text)}")
    prompt_name, completion_name = data.prompt_field, data.completion_field
    prompt, completion = row.get(prompt_name), row.get(completion_name)
    for name, value, key in ((prompt_name, prompt, "prompt_field"), (completion_name, completion, "completion_field")):
        if value is None:
            return name, f"missing (data.{key})" if name not in row else "null"
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            return completion_name, f"must be a string like the prompt, got {json_kind(completion)}"
        if not completion.strip():
            return completion_name, "an empty completion (nothing to learn)"
        return None
    if not isinstance(prompt, (list, tuple)):
        return prompt_name, f"must be a string or a list of {{role, content}} messages, got {json_kind(prompt)}"
    if not isinstance(completion, (list, tuple)):
        return completion_name, f"must be a list of messages like the prompt, got {json_kind(completion)}"
    if not prompt:
        return prompt_name, "an empty list of messages"
    if not completion:
        return completion_name, "an empty completion (no messages)"
    problem = _messages_problem(prompt, prompt_name) or _messages_problem(completion, completion_name)
    if problem:
        return problem
    for index, message in enumerate(completion):
        if message["role"] != ASSISTANT:
            return (f"{completion_name}[{index}].role",
                    f"a completion holds assistant messages only, got {message['role']!r}")
    return None


def rows_problems(rows: Sequence[Any], data: DataSettings, fmt: str, split: str = "train",
                  limit: int = 8) -> Tuple[List[str], int]:
    """(the first `limit` problems, the number of bad rows) of the rows of a chat format; each problem names
    the file, the row (and line) and the field. Text rows are checked where they are tokenized, as before."""
    if fmt == TEXT:
        return [], 0
    problems, bad = [], 0
    for index, row in enumerate(rows):
        problem = row_problem(row, data, fmt)
        if problem:
            bad += 1
            if len(problems) < limit:
                problems.append(f"{row_place(rows, index, split)}, field {problem[0]}: {problem[1]}")
    return problems, bad


def check_rows(rows: Sequence[Any], data: DataSettings, fmt: str, split: str = "train") -> None:
    """DataError naming the first bad row (file, row, field) and how many more there are."""
    problems, bad = rows_problems(rows, data, fmt, split, limit=1)
    if bad:
        more = f" (and {bad - 1} more bad rows)" if bad > 1 else ""
        raise DataError(f"{problems[0]}{more}")


def row_text(row: Mapping[str, Any], data: DataSettings, fmt: str) -> Optional[str]:
    """The words of a row as one plain text (for the train/eval overlap check); None where it has none."""
    def words(value: Any) -> Optional[str]:
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)):
            return "\n".join(message["content"] for message in value
                             if isinstance(message, Mapping) and isinstance(message.get("content"), str))
        return None

    if not isinstance(row, Mapping):
        return None
    if fmt == TOKENS:
        from trainers.token_data import row_words

        return row_words(row, data)
    if fmt == MESSAGES:
        return words(row.get(data.messages_field))
    if fmt == PROMPT_COMPLETION:
        parts = [words(row.get(data.prompt_field)), words(row.get(data.completion_field))]
        return None if None in parts else "\n".join(parts)
    return words(row.get(data.text_field))


# --- chat rendering and the completion mask --------------------------------------------------------------
def chat_template_of(tokenizer, data: DataSettings) -> str:
    """The template a chat row is rendered with: data.chat_template, else the tokenizer's own."""
    template = data.chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):   # named templates: the default one
        template = template.get("default")
    if not template:
        raise DataError(NO_CHAT_TEMPLATE)
    return template


def render_chat(tokenizer, messages: Sequence[Mapping[str, Any]], template: str, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template([dict(message) for message in messages], chat_template=template,
                                             tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:   # jinja syntax errors, raise_exception() in the template, missing variables
        raise DataError(f"the chat template cannot render it ({type(exc).__name__}: {exc})") from exc


def _generation_spans(tokenizer, messages: Sequence[Mapping[str, Any]], template: str):
    """(the rendered conversation, the character spans the template marks with {% generation %}).

    transformers' own assistant mask maps each span's last character to a token, and a span that ends in
    whitespace no token holds (a word-level tokenizer's) then runs to the end of the text; the spans mapped
    through the offsets here do not."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, indices = render_jinja_template(
            conversations=[[dict(message) for message in messages]], chat_template=template,
            return_assistant_tokens_mask=True, add_generation_prompt=False, **tokenizer.special_tokens_map)
    except Exception as exc:   # jinja syntax errors, raise_exception() in the template, missing variables
        raise DataError(f"the chat template cannot render it ({type(exc).__name__}: {exc})") from exc
    return rendered[0], [tuple(span) for span in indices[0]]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _tokens_with_spans(tokenizer, text: str, spans: Sequence[Tuple[int, int]],
                       add_special_tokens: bool) -> Tuple[List[int], List[int]]:
    """(token ids of `text`, 1 for each token that holds characters of a span [start, end), else 0).

    A fast tokenizer's offsets place each token; a slow one's prefixes do (the tokens of text[:start] and
    text[:end] that agree with the whole text's)."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        mask = [int(end > start and any(end > low and start < high for low, high in spans))
                for start, end in encoded["offset_mapping"]]
        return ids, mask
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    mask = [0] * len(ids)
    for low, high in spans:
        first = _common_prefix(ids, tokenizer(text[:low], add_special_tokens=add_special_tokens)["input_ids"])
        last = _common_prefix(ids, tokenizer(text[:high], add_special_tokens=add_special_tokens)["input_ids"])
        mask[first:last] = [1] * max(0, last - first)
    return ids, mask


def _assistant_spans(tokenizer, messages: Sequence[Mapping[str, Any]], template: str,
                     rendered: str, field: str) -> List[Tuple[int, int]]:
    """Character spans of the assistant turns in `rendered` (the whole conversation): each is what the turn adds
    to the conversation before it rendered with the generation prompt."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before = render_chat(tokenizer, messages[:index], template, generation_prompt=True)
        through = render_chat(tokenizer, messages[:index + 1], template, generation_prompt=False)
        if not (through.startswith(before) and rendered.startswith(through)):
            raise DataError(f"field {field}[{index}]: the chat template does not render this conversation turn by "
                            f"turn (the text up to this assistant turn is not a prefix of the whole), so the "
                            f"assistant's part cannot be found; give data.chat_template with {{% generation %}} "
                            f"markers around the assistant's part")
        spans.append((len(before), len(through)))
    return spans


def encode_row(row: Mapping[str, Any], tokenizer, data: DataSettings, fmt: str) -> Tuple[List[int], List[int]]:
    """(token ids, completion mask) of a prompt-completion or messages row, before truncation.

    The mask is 1 on the completion (the assistant turns, with their end-of-turn tokens) and 0 on the
    prompt. String prompts and completions are joined as they are (as TRL does) and end with EOS, which is
    part of the completion; chat rows are rendered with `chat_template_of`. DataError says what is wrong."""
    eos = tokenizer.eos_token_id
    if fmt == PROMPT_COMPLETION and isinstance(row[data.prompt_field], str):
        prompt, completion = row[data.prompt_field], row[data.completion_field]
        text = prompt + completion
        ids, mask = _tokens_with_spans(tokenizer, text, [(len(prompt), len(text))], add_special_tokens=True)
        if eos is not None:
            if ids and ids[-1] == eos:
                mask[-1] = 1          # the tokenizer's own EOS (offsets (0, 0)) ends the completion too
            else:
                ids, mask = ids + [eos], mask + [1]
    else:
        template = chat_template_of(tokenizer, data)
        if fmt == PROMPT_COMPLETION:
            prompt, completion = list(row[data.prompt_field]), list(row[data.completion_field])
            before = render_chat(tokenizer, prompt, template, generation_prompt=True)
            rendered = render_chat(tokenizer, prompt + completion, template, generation_prompt=False)
            if not rendered.startswith(before):
                raise DataError(f"field {data.prompt_field}: the chat template renders the prompt differently alone "
                                f"than followed by the completion, so the completion cannot be found")
            ids, mask = _tokens_with_spans(tokenizer, rendered, [(len(before), len(rendered))],
                                           add_special_tokens=False)
        else:
            messages = list(row[data.messages_field])
            if _GENERATION_TAG.search(template):
                rendered, spans = _generation_spans(tokenizer, messages, template)
                ids, mask = _tokens_with_spans(tokenizer, rendered, spans, add_special_tokens=False)
            else:
                rendered = render_chat(tokenizer, messages, template, generation_prompt=False)
                spans = _assistant_spans(tokenizer, messages, template, rendered, data.messages_field)
                ids, mask = _tokens_with_spans(tokenizer, rendered, spans, add_special_tokens=False)
    if not any(mask):
        raise DataError("the completion comes to no tokens")
    return ids, mask


def fit_to_length(ids: List[int], mask: List[int], max_length: int) -> Tuple[List[int], List[int], bool]:
    """(ids, mask, whether the completion fits) cut to at most max_length tokens, keeping the completion.

    Tokens after the last completion token go first (they teach nothing), then the prompt from the left.
    A completion (first to last completion token) longer than max_length alone loses the whole prompt
    and is cut at the right: it keeps its first max_length tokens, and does not fit."""
    if len(ids) <= max_length:
        return ids, mask, True
    trained = [index for index, value in enumerate(mask) if value]
    first, last = trained[0], trained[-1]
    if last - first + 1 <= max_length:
        start = max(0, last + 1 - max_length)
        return ids[start:last + 1], mask[start:last + 1], True
    return ids[first:first + max_length], mask[first:first + max_length], False


def chat_example(row: Mapping[str, Any], tokenizer, data: DataSettings, fmt: str,
                 max_length: Optional[int] = None) -> Tuple[Dict[str, List[int]], List[int], bool]:
    """({input_ids, attention_mask, labels}, completion mask, fits) of one prompt-completion or messages row.

    Labels are IGNORE_INDEX off the completion (all tokens count with completion_only_loss off)."""
    ids, mask = encode_row(row, tokenizer, data, fmt)
    ids, mask, fits = fit_to_length(ids, mask, data.max_length if max_length is None else max_length)
    labels = [token if (trained or not data.completion_only_loss) else IGNORE_INDEX
              for token, trained in zip(ids, mask)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, mask, fits


def marked_text(tokenizer, ids: Sequence[int], mask: Sequence[int], opening: str = "⟦", closing: str = "⟧") -> str:
    """The decoded tokens with each run of trained ones (mask 1) between `opening` and `closing`."""
    pieces, run, state = [], [], None
    for token, trained in list(zip(ids, mask)) + [(None, None)]:
        if trained != state and run:
            text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(f"{opening}{text}{closing}" if state else text)
            run = []
        state = trained
        if token is not None:
            run.append(token)
    return "".join(pieces)


def tokenize_rows(rows: Sequence[Dict[str, Any]], tokenizer, task: str, data: DataSettings,
                  labels: Optional[Dict[str, int]] = None, source: str = "train",
                  fmt: Optional[str] = None) -> List[Dict[str, List[int]]]:
    """Each row -> {input_ids, attention_mask[, label | labels]} truncated to data.max_length, not padded yet.

    `fmt`: the row format (None: `resolve_format` of these rows). Text rows carry no labels (the collator
    derives them: every token counts); prompt-completion and messages rows carry their own."""
    fmt = fmt or resolve_format(data, task, rows)
    if task == TOKEN_CLASSIFICATION:
        from trainers.token_data import tokenize_token_rows

        return tokenize_token_rows(rows, tokenizer, data, labels, source=source)
    if task == CAUSAL_LM and fmt != TEXT:
        examples = []
        for index, row in enumerate(rows):
            problem = row_problem(row, data, fmt)
            try:
                if problem:
                    raise DataError(f"field {problem[0]}: {problem[1]}")
                examples.append(chat_example(row, tokenizer, data, fmt)[0])
            except DataError as exc:
                raise DataError(f"{row_place(rows, index, source)}: {exc}") from exc
        return examples
    texts = []
    for index, row in enumerate(rows):
        text = row.get(data.text_field)
        if not isinstance(text, str):
            raise DataError(f"{source} row {index}: field {data.text_field!r} (data.text_field) is missing or not text")
        texts.append(text)
    encoded = tokenizer(texts, truncation=True, max_length=data.max_length)
    examples = []
    for index, (ids, mask) in enumerate(zip(encoded["input_ids"], encoded["attention_mask"])):
        example = {"input_ids": list(ids), "attention_mask": list(mask)}
        if task == CLASSIFICATION:
            label = str(rows[index].get(data.label_field))
            if label not in labels:
                raise DataError(f"{source} row {index}: label {label!r} does not occur in train "
                                f"(train labels: {', '.join(labels)})")
            example["label"] = labels[label]
        elif tokenizer.eos_token_id is not None and ids and ids[-1] != tokenizer.eos_token_id \
                and len(ids) < data.max_length:
            # End each text with EOS so the model also learns where a text stops.
            example["input_ids"].append(tokenizer.eos_token_id)
            example["attention_mask"].append(1)
        examples.append(example)
    return examples


class _ListDataset(Dataset):
    def __init__(self, examples: List[Dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.examples[index]


class PadCollator:
    """Pads a batch to its longest row (dynamic padding), right-side.

    Causal LM labels are the input ids with padding set to IGNORE_INDEX; they come from the attention
    mask, not the pad id, because the pad token may be the EOS token, which must still be learnt.
    Rows that carry their own labels (prompt-completion, messages) keep them, padded with IGNORE_INDEX.
    """

    def __init__(self, pad_token_id: int, task: str):
        self.pad_token_id = pad_token_id
        self.task = task

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.task == CLASSIFICATION:
            batch["labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
        elif "labels" in examples[0]:   # prompt-completion / messages: IGNORE_INDEX off the completion
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
            for row, example in enumerate(examples):
                labels[row, :len(example["labels"])] = torch.tensor(example["labels"], dtype=torch.long)
            batch["labels"] = labels
        else:
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if KEEP in examples[0]:
            batch[KEEP] = torch.tensor([example[KEEP] for example in examples], dtype=torch.float32)
        return batch


@dataclass
class TrialData:
    train: DataLoader                    # this rank's shard; the same number of batches on every rank
    eval: DataLoader                     # this rank's shard, evened out with KEEP=0 duplicates
    labels: Optional[Dict[str, int]]     # classification: label -> id
    train_size: int                      # rows in the whole train split (all ranks)
    eval_size: int
    seed: int = 0                        # the shuffling seed (TrainingSettings.seed)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the train order for `epoch` (deterministic from the seed)."""
        sampler = self.train.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
            sampler.generator.manual_seed(self.seed + epoch)


@dataclass
class TrialRows:
    """The raw rows of a trial and its label mapping, before tokenization (no tokenizer needed)."""
    train: List[Dict[str, Any]]
    eval: List[Dict[str, Any]]
    labels: Optional[Dict[str, int]]     # classification: label -> id; token-classification: tag -> id
    format: str = TEXT                   # the rows' format (resolve_format of train)


def read_trial_rows(data: DataSettings, task: str) -> TrialRows:
    """The trial's rows, every one checked for its format (a bad row: DataError naming file, row and field)."""
    train_rows, eval_rows, fmt = split_with_format(data, task)
    if not train_rows or not eval_rows:
        raise DataError(f"{data.train}: the train and eval splits must both hold rows "
                        f"(got {len(train_rows)} train, {len(eval_rows)} eval)")
    labels = label_mapping(train_rows, data.label_field) if task == CLASSIFICATION else None
    if task == TOKEN_CLASSIFICATION:
        from trainers.token_data import tag_mapping, unseen_tags

        labels = tag_mapping(train_rows, data)
        unseen = unseen_tags(eval_rows, labels, data)
        if unseen:   # a tag the model has no output for: an error now, not a crash in the first eval
            raise DataError(unseen)
    return TrialRows(train=train_rows, eval=eval_rows, labels=labels, format=fmt)


def build_data(rows: TrialRows, data: DataSettings, tokenizer, task: str, batch_size: int, seed: int,
               ctx: DistContext) -> TrialData:
    """Tokenized train / eval loaders for this rank."""
    train_examples = tokenize_rows(rows.train, tokenizer, task, data, rows.labels, source="train", fmt=rows.format)
    eval_examples = tokenize_rows(rows.eval, tokenizer, task, data, rows.labels, source="eval", fmt=rows.format)
    collate = PadCollator(tokenizer.pad_token_id, task)
    if task == TOKEN_CLASSIFICATION:
        from trainers.token_data import TokenCollator

        collate = TokenCollator(tokenizer.pad_token_id, rows.labels)

    if ctx.world_size > 1:
        if len(train_examples) < ctx.world_size:
            raise DataError(f"{data.train}: {len(train_examples)} train rows cannot be shared by {ctx.world_size} workers")
        # drop_last: every rank gets len // world_size rows, so no rank runs out of batches first and hangs
        # the others in a collective.
        sampler = DistributedSampler(train_examples, num_replicas=ctx.world_size, rank=ctx.rank,
                                     shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = RandomSampler(train_examples, generator=torch.Generator().manual_seed(seed))
    train_loader = DataLoader(_ListDataset(train_examples), batch_size=batch_size, sampler=sampler,
                              collate_fn=collate)
    eval_loader = DataLoader(_ListDataset(eval_shard(eval_examples, ctx.rank, ctx.world_size)),
                             batch_size=batch_size, shuffle=False, collate_fn=collate)
    return TrialData(train=train_loader, eval=eval_loader, labels=rows.labels,
                     train_size=len(train_examples), eval_size=len(eval_examples), seed=seed)


def eval_shard(examples: List[Dict[str, Any]], rank: int, world_size: int) -> List[Dict[str, Any]]:
    """Rows rank, rank + world_size, ...; shards shorter than the longest get a copy of a row with KEEP=0.

    Every rank then runs the same number of forward passes (ZeRO-3 gathers parameters collectively in
    each one), and the metrics count every row exactly once.
    """
    shard = [{**example, KEEP: 1.0} for example in examples[rank::world_size]]
    longest = -(-len(examples) // world_size)
    while len(shard) < longest:
        shard.append({**examples[0], KEEP: 0.0})
    return shard


def batch_stream(trial_data: TrialData) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
    """(epoch, batch) forever: the train loader epoch after epoch, reshuffled each epoch."""
    epoch = 0
    while True:
        trial_data.set_epoch(epoch)
        for batch in trial_data.train:
            yield epoch, batch
        epoch += 1
