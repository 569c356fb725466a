"""Token classification (NER) rows: reading, checking, the tag set, and tags aligned to sub-word tokens.

A row is a list of words and one BIO tag per word (`O`, `B-TYPE`, `I-TYPE`), from JSON lines (fields
data.tokens_field and data.tags_field) or from a CoNLL column file (`.conll`, or `.txt` when the task is
token-classification): one word per line with its tag in the last column, a blank line between sentences,
`-DOCSTART-` lines skipped. CoNLL rows are given the same two fields, so everything after reading is shared.

Sub-words: the fast tokenizer splits each word (`is_split_into_words`); the first sub-token of a word carries
the word's tag, its other sub-tokens and the special tokens carry IGNORE_INDEX, so the loss and the metrics
count each word once. Words cut off by data.max_length are neither trained on nor scored.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from trainers.data import IGNORE_INDEX, KEEP, TOKEN_CLASSIFICATION, PadCollator, json_kind
from trainers.records import DataError, Records, read_records, row_place
from trainers.settings import DataSettings

TAG_NAMES = "tag_names"           # eval batches only: the tag of each label id, for entity-level metrics
CONLL_SUFFIXES = (".conll", ".txt")
DOCSTART = "-DOCSTART-"
_BIO_TAG = re.compile(r"O|[BI]-\S+")


# --- reading ---------------------------------------------------------------------------------------
def read_token_records(source: str, data: DataSettings, split: str = "train") -> Records:
    """The rows of `source`: a CoNLL column file by its suffix, anything else as trainers.records reads it."""
    if source.endswith(CONLL_SUFFIXES) and os.path.isfile(source):
        return read_conll(source, data.tokens_field, data.tags_field)
    return read_records(source, split=split)


def read_conll(path: str, tokens_field: str = "tokens", tags_field: str = "tags") -> Records:
    """One row {tokens_field: words, tags_field: tags} per sentence, each remembering its first line."""
    rows: List[Dict[str, Any]] = []
    lines: List[int] = []
    words: List[str] = []
    tags: List[str] = []
    first = 0

    def end_sentence() -> None:
        nonlocal words, tags
        if words:
            rows.append({tokens_field: words, tags_field: tags})
            lines.append(first)
        words, tags = [], []

    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                columns = line.split()
                if not columns:
                    end_sentence()
                    continue
                if columns[0] == DOCSTART:
                    end_sentence()   # a document boundary ends a sentence too
                    continue
                if len(columns) < 2:
                    raise DataError(f"{path}:{number}: a CoNLL line needs a word and its tag (the last column), "
                                    f"got {line.strip()!r}")
                if not words:
                    first = number
                words.append(columns[0])
                tags.append(columns[-1])
        end_sentence()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return Records(rows, source=path, lines=lines)


# --- checking --------------------------------------------------------------------------------------
def token_row_problem(row: Any, data: DataSettings) -> Optional[Tuple[str, str]]:
    """(field, what is wrong) of a words + tags row, or None when it can be trained on."""
    if not isinstance(row, Mapping):
        return "row", f"must be a mapping of fields, got {json_kind(row)}"
    words_name, tags_name = data.tokens_field, data.tags_field
    words, tags = row.get(words_name), row.get(tags_name)
    for name, value, key in ((words_name, words, "tokens_field"), (tags_name, tags, "tags_field")):
        if value is None:
            return name, f"missing (data.{key})" if name not in row else "null, not a list"
        if not isinstance(value, (list, tuple)):
            return name, f"must be a list of strings, got {json_kind(value)}"
    if not words:
        return words_name, "an empty list of words (nothing to tag)"
    for index, word in enumerate(words):
        if not isinstance(word, str) or not word.strip():
            return f"{words_name}[{index}]", f"must be a non-empty string, got {json_kind(word)}"
    if len(tags) != len(words):
        return tags_name, f"has {len(tags)} tags for {len(words)} words; needs one tag per word"
    for index, tag in enumerate(tags):
        if not isinstance(tag, str):
            return f"{tags_name}[{index}]", f"must be a string, got {json_kind(tag)}"
        if not _BIO_TAG.fullmatch(tag):
            return f"{tags_name}[{index}]", f"{tag!r} is not a BIO tag (O, B-TYPE or I-TYPE)"
    return None


def tag_mapping(train_rows: Sequence[Mapping[str, Any]], data: DataSettings) -> Dict[str, int]:
    """Tag -> id, from the sorted distinct tags of train (rows checked already): identical in every trial."""
    tags = sorted({tag for row in train_rows for tag in row[data.tags_field]})
    if not any(tag != "O" for tag in tags):
        raise DataError(f"{data.train}: train holds no entity tag (only {', '.join(tags) or 'nothing'}); "
                        f"token-classification needs B-TYPE / I-TYPE tags to learn")
    return {tag: index for index, tag in enumerate(tags)}


def unseen_tags(rows: Sequence[Mapping[str, Any]], labels: Mapping[str, int], data: DataSettings,
                split: str = "eval") -> Optional[str]:
    """A message naming the first row that holds a tag train lacks (and the tags), or None."""
    for index, row in enumerate(rows):
        unseen = sorted(set(row[data.tags_field]) - set(labels))
        if unseen:
            return (f"{row_place(rows, index, split)}, field {data.tags_field}: tag(s) {', '.join(unseen)} do not "
                    f"occur in train (train tags: {', '.join(labels)})")
    return None


# --- sub-word alignment ----------------------------------------------------------------------------
def align_labels(word_ids: Sequence[Optional[int]], word_tags: Sequence[str], labels: Mapping[str, int]) -> List[int]:
    """One label per sub-token: the word's tag id on its first sub-token, IGNORE_INDEX on the others and on
    special tokens (word id None)."""
    aligned, previous = [], None
    for word in word_ids:
        aligned.append(IGNORE_INDEX if word is None or word == previous else labels[word_tags[word]])
        previous = word
    return aligned


def tokenize_token_rows(rows: Sequence[Mapping[str, Any]], tokenizer, data: DataSettings,
                        labels: Mapping[str, int], source: str = "train") -> List[Dict[str, List[int]]]:
    """Each row -> {input_ids, attention_mask, labels} truncated to data.max_length, not padded yet."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"token-classification needs a fast tokenizer (its word_ids() map sub-tokens to words); "
                        f"{type(tokenizer).__name__} is not one")
    examples = []
    for index, row in enumerate(rows):
        problem = token_row_problem(row, data)
        if problem:
            raise DataError(f"{row_place(rows, index, source)}, field {problem[0]}: {problem[1]}")
        words, tags = list(row[data.tokens_field]), list(row[data.tags_field])
        unseen = sorted(set(tags) - set(labels))
        if unseen:
            raise DataError(f"{row_place(rows, index, source)}, field {data.tags_field}: tag(s) {', '.join(unseen)} "
                            f"do not occur in train (train tags: {', '.join(labels)})")
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=data.max_length)
        examples.append({"input_ids": list(encoded["input_ids"]), "attention_mask": list(encoded["attention_mask"]),
                         "labels": align_labels(encoded.word_ids(), tags, labels)})
    return examples


class TokenCollator(PadCollator):
    """PadCollator (labels padded with IGNORE_INDEX) that also hands eval batches the tag of each label id:
    entity-level metrics (trainers/token_metrics.py) read the tags, not the ids. Train batches go to the
    model's forward as they are, so they carry tensors only."""

    def __init__(self, pad_token_id: int, labels: Mapping[str, int]):
        super().__init__(pad_token_id, TOKEN_CLASSIFICATION)
        self.tag_names = tuple(sorted(labels, key=labels.get))

    def __call__(self, examples):
        batch = super().__call__(examples)
        if KEEP in batch:
            batch[TAG_NAMES] = self.tag_names
        return batch


def row_words(row: Mapping[str, Any], data: DataSettings) -> Optional[str]:
    """A row's words as one text (the train/eval overlap check)."""
    words = row.get(data.tokens_field) if isinstance(row, Mapping) else None
    if isinstance(words, (list, tuple)) and all(isinstance(word, str) for word in words):
        return " ".join(words)
    return None
