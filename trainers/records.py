"""Read raw training records (a list of dicts) from .jsonl, .csv, .txt files or an HF dataset id.

Shared by `peft-search validate` (which checks rows and fields before anything starts) and the
trainer recipe (which tokenizes them).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".conll")   # .conll: token-classification (trainers/token_data.py)


class DataError(ValueError):
    """A data source that cannot be used; the message names the file and what is wrong."""


class Records(list):
    """The rows of one source (a list of dicts) that remember where each came from.

    `source`: the file or dataset id; `lines`: each row's 1-based line in the file (None for an HF dataset,
    whose rows have no lines). A problem with a row can then name the file, the row and the line.
    """

    def __init__(self, rows: Iterable[Dict[str, Any]] = (), source: str = "", lines: Optional[List[int]] = None):
        super().__init__(rows)
        self.source = source
        self.lines = lines

    def where(self, index: int) -> str:
        """`FILE, row N (line L)` of row `index` (0-based); the line is left out where it is the row number."""
        line = self.lines[index] if self.lines is not None and index < len(self.lines) else None
        shown = f" (line {line})" if line is not None and line != index + 1 else ""
        return f"{self.source}, row {index + 1}{shown}"


def row_place(rows, index: int, split: str = "train") -> str:
    """Where row `index` of `rows` is: `FILE, row N (line L)` for Records, `train row N` for a plain list."""
    if isinstance(rows, Records) and rows.source:
        return rows.where(index)
    return f"{split} row {index + 1}"


# A data.chat_template value that holds a template rather than naming a file.
_TEMPLATE_MARKERS = ("{%", "{{")


def is_template_text(value: str) -> bool:
    return any(marker in value for marker in _TEMPLATE_MARKERS)


def read_chat_template(value: Optional[str]) -> Optional[str]:
    """data.chat_template as Jinja text: the value itself when it holds a template, else the file it names."""
    if value is None or is_template_text(value):
        return value
    path = os.path.expanduser(value)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise DataError(f"{value}: cannot read the chat template ({exc.strerror or exc}); data.chat_template takes "
                        f"a Jinja template or the path of a file holding one") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{value}: the chat template is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise DataError(f"{value}: the chat template file is empty")
    return text


def is_local_source(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or os.path.exists(source)


def read_records(source: str, split: str = "train") -> Records:
    """All rows of `source`, as Records (which know each row's line). `.txt` gives one record per non-empty
    line under the key "text"."""
    if not is_local_source(source):
        return Records(_read_hub_dataset(source, split), source=source)
    if os.path.isdir(source):
        raise DataError(f"{source}: is a directory, not a data file ({', '.join(LOCAL_SUFFIXES)})")
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file")
    try:
        if source.endswith((".jsonl", ".json")):
            rows, lines = _read_jsonl(source)
        elif source.endswith(".csv"):
            rows, lines = _read_csv(source)
        else:
            with open(source, encoding="utf-8") as handle:
                numbered = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
            rows, lines = [{"text": line.rstrip("\n")} for _number, line in numbered], [n for n, _l in numbered]
        return Records(rows, source=source, lines=lines)
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:   # unreadable (permissions, a device that fails): say so rather than crash
        raise DataError(f"{source}: cannot read ({exc.strerror or exc})") from exc


def _read_csv(path: str) -> Tuple[List[Dict[str, Any]], List[int]]:
    """(rows, the line each row starts on)."""
    rows, lines = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        try:
            ended = None   # the line the previous record ended on (the header's, before the first)
            for row in reader:
                lines.append(1 + (ended if ended is not None else 1))
                ended = reader.line_num
                rows.append(dict(row))
        except csv.Error as exc:   # e.g. a field over csv's 128 KiB limit: a file that is not a table
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from exc
    return rows, lines


def _read_jsonl(path: str) -> Tuple[List[Dict[str, Any]], List[int]]:
    """(rows, the line of each row); blank lines are skipped."""
    rows, lines = [], []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
            lines.append(line_number)
    return rows, lines


def _read_hub_dataset(dataset_id: str, split: str) -> List[Dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{dataset_id}: HF dataset ids need `pip install 'peft-search[hub-datasets]'`") from exc
    try:
        return [dict(row) for row in datasets.load_dataset(dataset_id, split=split)]
    except Exception as exc:  # hub errors come in many types; the reason is what matters to the user
        raise DataError(f"{dataset_id}: cannot load as an HF dataset ({type(exc).__name__}: {exc})") from exc
